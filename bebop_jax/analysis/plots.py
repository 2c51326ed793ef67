"""Figures for the entropy study: each `plot_*` builds and returns a Figure; `save_figure`
writes it as a PNG. Selects the non-interactive Agg backend, unless pyplot was already
imported (a notebook's inline backend is left alone)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

if "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

COLORS = {"rejection": "tab:blue", "greedy": "tab:orange"}
FIGSIZE = (6.4, 4.4)
FIELD_LABELS = {"mean_accepted": "mean accepted drafts per verify step",
                "acceptance_rate": "acceptance rate"}


def _new() -> tuple[Figure, plt.Axes]:
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.grid(True, alpha=0.3)
    return fig, ax


def plot_entropy_law(records: Sequence[Mapping], fits: Mapping[str, Mapping]) -> Figure:
    """Acceptance vs entropy per method (scatter) with each fit line; slope/R² in legend."""
    if not records:
        raise ValueError("records: empty")
    methods = [m for m in fits if m != "by_task" and isinstance(fits[m], Mapping)]
    if not methods:
        raise ValueError("fits: no method fits")
    fig, ax = _new()
    for i, m in enumerate(methods):
        rs = [r for r in records if m in r["acceptance"]]
        if not rs:
            continue
        x = np.array([float(r["entropy"]) for r in rs])
        y = np.array([float(r["acceptance"][m]) for r in rs])
        c = COLORS.get(m, f"C{i + 2}")
        f = fits[m]
        ax.scatter(x, y, color=c, alpha=0.7, s=22,
                   label=f"{m} (slope {f['slope']:+.3f}/nat, R² {f['r2']:.3f})")
        xs = np.linspace(x.min(), x.max(), 50)
        ax.plot(xs, f["slope"] * xs + f["intercept"], color=c, lw=2)
    ax.set_xlabel("mean token entropy (nats)")
    ax.set_ylabel("acceptance rate")
    ax.set_title("MTP acceptance vs policy entropy")
    ax.legend(loc="best")
    return fig


def plot_gap_vs_entropy(gaps: Sequence[Mapping]) -> Figure:
    """Rejection - greedy acceptance gap vs entropy."""
    if not gaps:
        raise ValueError("gaps: empty")
    g = sorted(gaps, key=lambda d: d["entropy"])
    fig, ax = _new()
    ax.plot([d["entropy"] for d in g], [d["gap"] for d in g], "o-", color="tab:green",
            label="rejection − greedy")
    ax.axhline(0.0, color="gray", lw=1, ls="--")
    ax.set_xlabel("mean token entropy (nats)")
    ax.set_ylabel("acceptance gap (rejection − greedy)")
    ax.set_title("Rejection-sampling advantage vs entropy")
    ax.legend(loc="best")
    return fig


def plot_acceptance_through_training(history_by_strategy: Mapping[str, Sequence[Mapping]],
                                     field: str = "mean_accepted") -> Figure:
    """One line per MTP strategy: `field` over RL steps."""
    if not history_by_strategy:
        raise ValueError("history_by_strategy: empty")
    fig, ax = _new()
    drawn = 0
    for name, hist in history_by_strategy.items():
        rows = sorted((h for h in hist if h.get(field) is not None), key=lambda h: h["step"])
        if rows:
            ax.plot([h["step"] for h in rows], [h[field] for h in rows], marker=".", label=name)
            drawn += 1
    if not drawn:
        plt.close(fig)
        raise ValueError(f"history_by_strategy: no entries with {field!r}")
    ax.set_xlabel("RL step")
    ax.set_ylabel(FIELD_LABELS.get(field, field))
    ax.set_title("MTP acceptance through RL, by strategy")
    ax.legend(loc="best")
    return fig


def plot_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
                xlabel: str, ylabel: str, title: str) -> Figure:
    """Generic multi-line plot, one labelled line per curve {label: (x, y)}."""
    if not curves:
        raise ValueError("curves: empty")
    for label, (x, y) in curves.items():
        if len(x) == 0 or len(x) != len(y):
            raise ValueError(f"curves[{label!r}]: x and y must be non-empty, equal length")
    fig, ax = _new()
    for label, (x, y) in curves.items():
        ax.plot(x, y, marker="." if len(x) < 50 else None, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="best")
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = 100) -> Path:
    """Write `fig` as a PNG at `path` (atomically, parents created) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return path
