"""Entropy / acceptance fits and the study's tests: plain numpy / scipy, JSON-able results
(Python floats and ints).

Records (one batch, or one task within a batch, of decoding) are dicts with
"entropy" (mean token entropy, nats), "acceptance" ({method: rate in [0, 1]}, methods
"greedy" / "rejection"), and optionally "task" and "weight" (e.g. the token count;
records without one weigh 1.0 when others have one).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.stats

METHODS = ("rejection", "greedy")


def _as_1d(name: str, values: Any) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected a sequence of numbers ({e})") from None
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains non-finite values")
    return arr


def linear_fit(x: Sequence[float], y: Sequence[float],
               weights: Sequence[float] | None = None) -> dict:
    """(Weighted) least squares y ~ slope*x + intercept -> {slope, intercept, r2, n}."""
    xs, ys = _as_1d("x", x), _as_1d("y", y)
    if xs.size < 2:
        raise ValueError(f"x: need at least 2 points, got {xs.size}")
    if ys.size != xs.size:
        raise ValueError(f"y: length {ys.size} does not match x's {xs.size}")
    if weights is None:
        w = np.ones_like(xs)
    else:
        w = _as_1d("weights", weights)
        if w.size != xs.size:
            raise ValueError(f"weights: length {w.size} does not match x's {xs.size}")
        if np.any(w < 0) or w.sum() <= 0:
            raise ValueError("weights: must be >= 0 with a positive sum")
    wsum = w.sum()
    xm, ym = (w * xs).sum() / wsum, (w * ys).sum() / wsum
    if np.ptp(xs[w > 0]) == 0:
        raise ValueError("x: all (positively weighted) values are equal; slope undefined")
    sxx = (w * (xs - xm) ** 2).sum()
    slope = (w * (xs - xm) * (ys - ym)).sum() / sxx
    intercept = ym - slope * xm
    ss_res = (w * (ys - slope * xs - intercept) ** 2).sum()
    ss_tot = (w * (ys - ym) ** 2).sum()
    r2 = 1.0 if ss_tot == 0 else 1.0 - ss_res / ss_tot
    return {"slope": float(slope), "intercept": float(intercept),
            "r2": float(min(r2, 1.0)), "n": int(xs.size)}


def _check_records(records: Sequence[Mapping]) -> None:
    if not records:
        raise ValueError("records: empty")
    for i, r in enumerate(records):
        if "entropy" not in r or not isinstance(r.get("acceptance"), Mapping):
            raise ValueError(f"records[{i}]: needs 'entropy' and an 'acceptance' dict")
        if not math.isfinite(float(r["entropy"])) or float(r["entropy"]) < 0:
            raise ValueError(f"records[{i}]: entropy must be finite and >= 0")
        for m, a in r["acceptance"].items():
            if not (0.0 <= float(a) <= 1.0):
                raise ValueError(f"records[{i}]: acceptance[{m!r}]={a} not in [0, 1]")


def _fit_method(records: Sequence[Mapping], method: str) -> dict:
    rs = [r for r in records if method in r["acceptance"]]
    x = [float(r["entropy"]) for r in rs]
    y = [float(r["acceptance"][method]) for r in rs]
    w = None
    if any("weight" in r for r in rs):
        w = [float(r.get("weight", 1.0)) for r in rs]
    return linear_fit(x, y, w)


def entropy_law(records: Sequence[Mapping], *, key: str = "rejection") -> dict:
    """Acceptance-vs-entropy line per method, overall and per task.

    Returns {method: fit} for `key` (required: ValueError if it cannot be fit) and for
    each other method in ("rejection", "greedy") that any record has, plus
    "by_task": {task: {method: fit}} for tasks with >= 2 records (methods that cannot be
    fit there, too few points or constant entropy, are skipped).
    """
    _check_records(records)
    methods = [key] + [m for m in METHODS if m != key]
    out: dict[str, Any] = {}
    for m in methods:
        if m != key and not any(m in r["acceptance"] for r in records):
            continue
        try:
            out[m] = _fit_method(records, m)
        except ValueError as e:
            raise ValueError(f"records: cannot fit method {m!r}: {e}") from None
    by_task: dict[str, dict] = {}
    tasks = sorted({r["task"] for r in records if "task" in r}, key=str)
    for t in tasks:
        rs = [r for r in records if r.get("task") == t]
        if len(rs) < 2:
            continue
        fits = {}
        for m in out:
            try:
                fits[m] = _fit_method(rs, m)
            except ValueError:
                pass
        if fits:
            by_task[str(t)] = fits
    out["by_task"] = by_task
    return out


def gap_vs_entropy(records: Sequence[Mapping]) -> list[dict]:
    """[{entropy, gap}] sorted by entropy, gap = acceptance rejection - greedy."""
    _check_records(records)
    gaps = [{"entropy": float(r["entropy"]),
             "gap": float(r["acceptance"]["rejection"]) - float(r["acceptance"]["greedy"])}
            for r in records if "rejection" in r["acceptance"] and "greedy" in r["acceptance"]]
    return sorted(gaps, key=lambda g: g["entropy"])


def gap_summary(gaps: Sequence[Mapping], split: float | None = None) -> dict:
    """Mean gap at entropy <= split vs > split (split defaults to the median entropy).

    A side with no points gets None.
    """
    if not gaps:
        raise ValueError("gaps: empty")
    e = _as_1d("gaps", [g["entropy"] for g in gaps])
    g = _as_1d("gaps", [g["gap"] for g in gaps])
    if split is None:
        split = float(np.median(e))
    elif not math.isfinite(split):
        raise ValueError(f"split: must be finite, got {split}")
    low, high = g[e <= split], g[e > split]
    return {"low_entropy_gap": float(low.mean()) if low.size else None,
            "high_entropy_gap": float(high.mean()) if high.size else None,
            "split_entropy": float(split)}


def acceptance_through_training(history_by_strategy: Mapping[str, Sequence[Mapping]], *,
                                field: str = "mean_accepted") -> dict[str, dict]:
    """Per strategy: mean `field` over the first / last min(3, n) steps and its slope.

    Entries are ordered by "step"; entries without `field` are skipped. Returns
    {strategy: {acceptance_start, acceptance_end, slope_per_step, n}}, slope_per_step
    None when fewer than 2 usable entries (or all at one step).
    """
    if not history_by_strategy:
        raise ValueError("history_by_strategy: empty")
    out = {}
    for name, hist in history_by_strategy.items():
        rows = sorted((h for h in hist if h.get(field) is not None), key=lambda h: h["step"])
        if not rows:
            raise ValueError(f"history_by_strategy[{name!r}]: no entries with {field!r}")
        steps = _as_1d(f"history_by_strategy[{name!r}] step", [h["step"] for h in rows])
        vals = _as_1d(f"history_by_strategy[{name!r}] {field}", [h[field] for h in rows])
        k = min(3, len(rows))
        slope = None
        if len(rows) >= 2 and np.ptp(steps) > 0:
            slope = linear_fit(steps, vals)["slope"]
        out[name] = {"acceptance_start": float(vals[:k].mean()),
                     "acceptance_end": float(vals[-k:].mean()),
                     "slope_per_step": slope, "n": int(len(rows))}
    return out


def strategies_summary(history_by_strategy: Mapping[str, Sequence[Mapping]], num_draft: int) -> dict[str, dict]:
    """RL with each MTP strategy from the same start, summarised from each run's history
    (entries with "step", "mean_accepted", "train_seconds", "entropy").

    Per strategy: acceptance at the start / end (as rates, E[accepted] / ``num_draft``, and
    as E[accepted]), its slope per step, the median train-step seconds past the first two
    steps (the compiles) and their ratio to "frozen"'s (None without a frozen run), the
    rollout entropy at the first / last step, the last 10 steps' E[accepted], and (beside
    a frozen run) the Welch t-test p-value of those against frozen's (None if undefined).
    """
    through = acceptance_through_training(history_by_strategy, field="mean_accepted")
    cost = lambda name: float(np.median([h["train_seconds"] for h in history_by_strategy[name][2:]]))
    base = cost("frozen") if "frozen" in history_by_strategy else None
    out = {}
    for name, t in through.items():
        hist = history_by_strategy[name]
        out[name] = {"acceptance_start": t["acceptance_start"] / num_draft,
                     "acceptance_end": t["acceptance_end"] / num_draft,
                     "mean_accepted_start": t["acceptance_start"], "mean_accepted_end": t["acceptance_end"],
                     "slope_per_step": t["slope_per_step"], "train_seconds": cost(name),
                     "train_cost_ratio": cost(name) / base if base else None,
                     "last10_mean_accepted": [h["mean_accepted"] for h in hist[-10:]],
                     "entropy_start": hist[0]["entropy"], "entropy_end": hist[-1]["entropy"]}
    if "frozen" in out:
        for name, s in out.items():
            if name != "frozen":
                p = scipy.stats.ttest_ind(s["last10_mean_accepted"], out["frozen"]["last10_mean_accepted"],
                                          equal_var=False).pvalue
                s["end_vs_frozen_pvalue"] = None if np.isnan(p) else float(p)
    return out


def losses_summary(pretrain_results: Mapping, per_row: Mapping[str, Sequence[float]],
                   temperature: str = "1.0") -> dict:
    """The losses compared: pretrain_mtp's acceptance table at ``temperature`` (a key of its
    results.json), plus paired tests of e2e_tv against ce and kl over the held-out prompts.

    ``per_row[loss]``: each held-out prompt's teacher-forced E[accepted] (rejection), in the
    same prompt order for every loss; a comparison is made where both losses have rows.
    Returns {table: {loss: {accept_rate, greedy_accept_rate, teacher_forced_mean_accepted}},
    temperature, tests: {"e2e_tv-ce" | "e2e_tv-kl": {accept_rate_points, teacher_forced_diff,
    n_prompts, paired_t_pvalue, wilcoxon_pvalue, e2e_tv_better_on}}, num_draft}.
    """
    k = pretrain_results["num_draft"]
    tf = pretrain_results["teacher_forced"]
    table = {loss: {"accept_rate": by_m["rejection"][temperature]["mean_accepted"] / k,
                    "greedy_accept_rate": by_m["greedy"][temperature]["mean_accepted"] / k,
                    "teacher_forced_mean_accepted": tf[loss][temperature]["mean_accepted"]["rejection"]}
             for loss, by_m in pretrain_results["acceptance"].items()}
    rows = {loss: np.asarray(r, dtype=np.float64) for loss, r in per_row.items()}
    tests = {}
    for other in ("ce", "kl"):
        if "e2e_tv" in rows and other in rows:
            diff = rows["e2e_tv"] - rows[other]
            tests[f"e2e_tv-{other}"] = {
                "accept_rate_points": 100 * (table["e2e_tv"]["accept_rate"] - table[other]["accept_rate"]),
                "teacher_forced_diff": float(diff.mean()), "n_prompts": int(diff.size),
                "paired_t_pvalue": float(scipy.stats.ttest_rel(rows["e2e_tv"], rows[other]).pvalue),
                "wilcoxon_pvalue": float(scipy.stats.wilcoxon(diff).pvalue),
                "e2e_tv_better_on": int((diff > 0).sum())}
    return {"table": table, "temperature": temperature, "tests": tests, "num_draft": k}
