"""bebop_jax.analysis: regression helpers vs numpy goldens, study metrics on hand-made
records, and figures checked before and after saving."""

import matplotlib.image as mpimg
import numpy as np
import pytest

from bebop_jax.analysis import (acceptance_through_training, entropy_law, gap_summary,
                                gap_vs_entropy, linear_fit, losses_summary,
                                plot_acceptance_through_training, plot_curves, plot_entropy_law,
                                plot_gap_vs_entropy, save_figure, strategies_summary,
                                study_report, why_not_linear, write_report)

# Rejection points all lie on 0.95 - 0.25 * H; greedy (R1-R3) fits -0.75 H + 59/60, R² 27/28.
RECORDS = [
    {"task": "b", "entropy": 1.0, "acceptance": {"rejection": 0.7, "greedy": 0.2}},
    {"task": "a", "entropy": 0.2, "acceptance": {"rejection": 0.9, "greedy": 0.8}},
    {"task": "c", "entropy": 0.5, "acceptance": {"rejection": 0.825}},
    {"task": "a", "entropy": 0.6, "acceptance": {"rejection": 0.8, "greedy": 0.6}},
    {"task": "c", "entropy": 0.5, "acceptance": {"rejection": 0.825}},
]
HISTORY = {
    "frozen": [{"step": s, "mean_accepted": v} for s, v in
               [(3, 2.6), (0, 2.0), (4, 2.8), (1, 2.2), (2, 2.4)]],
    "online_ce": [{"step": 0, "mean_accepted": 1.0}, {"step": 10, "mean_accepted": 2.0}],
    "single": [{"step": 5, "mean_accepted": 1.7}],
}


# ---------------------------------------------------------------- fits

def test_linear_fit_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=60)
    y = 0.7 * x - 0.3 + 0.5 * rng.normal(size=60)
    fit = linear_fit(x.tolist(), y)
    slope, intercept = np.polyfit(x, y, 1)
    assert fit["slope"] == pytest.approx(slope, rel=1e-10)
    assert fit["intercept"] == pytest.approx(intercept, rel=1e-10)
    assert fit["r2"] == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2, rel=1e-10)
    assert 0.3 < fit["r2"] < 0.9 and fit["n"] == 60
    assert all(type(fit[k]) is float for k in ("slope", "intercept", "r2"))
    assert type(fit["n"]) is int


def test_linear_fit_weighted_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 2, size=40)
    y = 1.0 - 0.4 * x + 0.2 * rng.normal(size=40)
    w = rng.uniform(0.05, 3.0, size=40)
    fit = linear_fit(x, y, weights=w)
    slope, intercept = np.polyfit(x, y, 1, w=np.sqrt(w))
    assert fit["slope"] == pytest.approx(slope, rel=1e-10)
    assert fit["intercept"] == pytest.approx(intercept, rel=1e-10)
    c = np.cov(x, y, aweights=w)
    assert fit["r2"] == pytest.approx(c[0, 1] ** 2 / (c[0, 0] * c[1, 1]), rel=1e-10)
    assert fit["slope"] != pytest.approx(linear_fit(x, y)["slope"], rel=1e-3)


def test_linear_fit_exact_line():
    fit = linear_fit([0.0, 1.0, 2.0, 5.0], [1.0, -1.0, -3.0, -9.0])
    assert fit == {"slope": pytest.approx(-2.0), "intercept": pytest.approx(1.0),
                   "r2": 1.0, "n": 4}


@pytest.mark.parametrize("args,kwargs,name", [
    (([1.0], [2.0]), {}, "x"),
    (([], []), {}, "x"),
    (([1.0, 2.0, 3.0], [1.0, 2.0]), {}, "y"),
    (([1.0, np.inf], [1.0, 2.0]), {}, "x"),
    (([1.0, 2.0], [1.0, np.nan]), {}, "y"),
    (([3.0, 3.0, 3.0], [1.0, 2.0, 3.0]), {}, "x"),
    (([1.0, 2.0], [1.0, 2.0]), {"weights": [1.0]}, "weights"),
    (([1.0, 2.0], [1.0, 2.0]), {"weights": [1.0, -1.0]}, "weights"),
    (([1.0, 2.0], [1.0, 2.0]), {"weights": [1.0, np.nan]}, "weights"),
    (([1.0, 2.0, 3.0], [1.0, 2.0, 0.0]), {"weights": [0.0, 1.0, 0.0]}, "x"),
])
def test_linear_fit_bad_input(args, kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        linear_fit(*args, **kwargs)


def test_entropy_law_hand_computed():
    out = entropy_law(RECORDS)
    rej, gr = out["rejection"], out["greedy"]
    assert rej["slope"] == pytest.approx(-0.25) and rej["intercept"] == pytest.approx(0.95)
    assert rej["r2"] == pytest.approx(1.0) and rej["n"] == 5
    assert gr["slope"] == pytest.approx(-0.75) and gr["intercept"] == pytest.approx(59 / 60)
    assert gr["r2"] == pytest.approx(27 / 28) and gr["n"] == 3
    # a: two points per method; b: one record; c: constant entropy -> both skipped.
    assert set(out["by_task"]) == {"a"}
    a = out["by_task"]["a"]
    assert a["rejection"]["slope"] == pytest.approx(-0.25)
    assert a["greedy"]["slope"] == pytest.approx(-0.5)
    assert a["greedy"]["intercept"] == pytest.approx(0.9)


def test_entropy_law_weights_and_missing_methods():
    recs = [{"entropy": e, "acceptance": {"rejection": a}, "weight": w}
            for e, a, w in [(0.0, 0.0, 1.0), (1.0, 1.0, 1.0), (2.0, 0.0, 2.0)]]
    out = entropy_law(recs)
    assert out["rejection"] == linear_fit([0, 1, 2], [0, 1, 0], [1, 1, 2])
    assert out["rejection"]["slope"] == pytest.approx(-1 / 11)
    assert "greedy" not in out and out["by_task"] == {}
    with pytest.raises(ValueError, match="records"):
        entropy_law(recs, key="greedy")
    with pytest.raises(ValueError, match="records"):
        entropy_law([])
    with pytest.raises(ValueError, match="records"):
        entropy_law([{"entropy": 0.1, "acceptance": {"rejection": 1.5}},
                     {"entropy": 0.2, "acceptance": {"rejection": 0.5}}])


def test_gap_vs_entropy_and_summary():
    gaps = gap_vs_entropy(RECORDS)
    assert [g["entropy"] for g in gaps] == [0.2, 0.6, 1.0]
    assert [g["gap"] for g in gaps] == pytest.approx([0.1, 0.2, 0.5])
    s = gap_summary(gaps)
    assert s["split_entropy"] == pytest.approx(0.6)
    assert s["low_entropy_gap"] == pytest.approx(0.15)
    assert s["high_entropy_gap"] == pytest.approx(0.5)
    s = gap_summary(gaps, split=0.3)
    assert s["low_entropy_gap"] == pytest.approx(0.1)
    assert s["high_entropy_gap"] == pytest.approx(0.35)
    assert gap_summary(gaps, split=2.0)["high_entropy_gap"] is None
    with pytest.raises(ValueError, match="gaps"):
        gap_summary([])


def test_acceptance_through_training():
    out = acceptance_through_training(HISTORY)
    f = out["frozen"]
    assert f["acceptance_start"] == pytest.approx(2.2)
    assert f["acceptance_end"] == pytest.approx(2.6)
    assert f["slope_per_step"] == pytest.approx(0.2) and f["n"] == 5
    o = out["online_ce"]
    assert o["acceptance_start"] == pytest.approx(1.5) == o["acceptance_end"]
    assert o["slope_per_step"] == pytest.approx(0.1) and o["n"] == 2
    assert out["single"] == {"acceptance_start": 1.7, "acceptance_end": 1.7,
                             "slope_per_step": None, "n": 1}
    hist = {"x": [{"step": i, "mean_accepted": 1.0, "acceptance_rate": r}
                  for i, r in enumerate([0.5, 0.6, 0.7, 0.8])] + [{"step": 9, "mean_accepted": 1}]}
    r = acceptance_through_training(hist, field="acceptance_rate")["x"]
    assert r["n"] == 4 and r["acceptance_start"] == pytest.approx(0.6)
    assert r["acceptance_end"] == pytest.approx(0.7) and r["slope_per_step"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="history_by_strategy"):
        acceptance_through_training({})
    with pytest.raises(ValueError, match="history_by_strategy"):
        acceptance_through_training({"x": [{"step": 0}]})


# ---------------------------------------------------------------- plots

def _check_axes(fig, legend=True):
    axes = fig.get_axes()
    assert axes
    for ax in axes:
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
        n_data = sum(len(l.get_xdata()) > 0 for l in ax.get_lines())
        n_data += sum(len(c.get_offsets()) > 0 for c in ax.collections)
        assert n_data > 0
        if legend:
            assert ax.get_legend() is not None
            assert all(t.get_text() for t in ax.get_legend().get_texts())
    return axes[0]


def _check_png(fig, path):
    w, h = fig.get_size_inches() * 100
    out = save_figure(fig, path)
    assert out == path and path.exists() and path.stat().st_size > 0
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    img = mpimg.imread(path)
    assert img.shape[:2] == (round(h), round(w))
    rgb = img[..., :3].reshape(-1, 3)
    assert rgb.std() > 0 and len(np.unique(rgb, axis=0)) > 10


def test_plot_entropy_law(tmp_path):
    fits = entropy_law(RECORDS)
    fig = plot_entropy_law(RECORDS, fits)
    ax = _check_axes(fig)
    assert ax.get_xlabel() == "mean token entropy (nats)"
    assert ax.get_ylabel() == "acceptance rate"
    assert [len(c.get_offsets()) for c in ax.collections] == [5, 3]
    colours = {tuple(c.get_facecolor()[0]) for c in ax.collections}
    assert len(colours) == 2
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(texts) == 2 and all("slope" in t and "R²" in t for t in texts)
    assert "rejection" in texts[0] and "-0.250" in texts[0] and "greedy" in texts[1]
    assert len(ax.get_lines()) == 2
    for line, m in zip(ax.get_lines(), ["rejection", "greedy"]):
        x, y = line.get_xdata(), line.get_ydata()
        assert np.allclose(y, fits[m]["slope"] * x + fits[m]["intercept"])
    _check_png(fig, tmp_path / "deep" / "dir" / "entropy_law.png")


def test_plot_gap_vs_entropy(tmp_path):
    gaps = gap_vs_entropy(RECORDS)
    fig = plot_gap_vs_entropy(gaps)
    ax = _check_axes(fig)
    assert np.allclose(ax.get_lines()[0].get_ydata(), [0.1, 0.2, 0.5])
    _check_png(fig, tmp_path / "gap.png")


def test_plot_acceptance_through_training(tmp_path):
    fig = plot_acceptance_through_training(HISTORY)
    ax = _check_axes(fig)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(HISTORY)
    assert list(ax.get_lines()[0].get_xdata()) == [0, 1, 2, 3, 4]
    assert np.allclose(ax.get_lines()[0].get_ydata(), [2.0, 2.2, 2.4, 2.6, 2.8])
    _check_png(fig, tmp_path / "through_rl.png")


def test_plot_curves(tmp_path):
    curves = {"sync-vanilla": ([0, 10, 20], [0.1, 0.3, 0.4]),
              "async-spec": ([0, 6, 12], [0.1, 0.35, 0.45])}
    fig = plot_curves(curves, xlabel="wall time (s)", ylabel="reward", title="reward vs time")
    ax = _check_axes(fig)
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == \
        ("wall time (s)", "reward", "reward vs time")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(curves)
    assert list(ax.get_lines()[1].get_xdata()) == [0, 6, 12]
    _check_png(fig, tmp_path / "curves.png")


def test_plots_reject_empty_input():
    with pytest.raises(ValueError, match="records"):
        plot_entropy_law([], {"rejection": {"slope": 0, "intercept": 0, "r2": 1, "n": 2}})
    with pytest.raises(ValueError, match="fits"):
        plot_entropy_law(RECORDS, {"by_task": {}})
    with pytest.raises(ValueError, match="gaps"):
        plot_gap_vs_entropy([])
    with pytest.raises(ValueError, match="history_by_strategy"):
        plot_acceptance_through_training({})
    with pytest.raises(ValueError, match="curves"):
        plot_curves({}, xlabel="x", ylabel="y", title="t")
    with pytest.raises(ValueError, match="curves"):
        plot_curves({"a": ([], [])}, xlabel="x", ylabel="y", title="t")


# ---------------------------------------------------------------- the study's summaries and report

def _rl_history(accepted, seconds, entropy=(0.5, 0.4)):
    return [{"step": i, "mean_accepted": a, "train_seconds": t,
             "entropy": entropy[0] if i == 0 else entropy[1]} for i, (a, t) in enumerate(zip(accepted, seconds))]


STUDY_HISTORY = {
    "frozen": _rl_history([1.6, 1.6, 1.6, 1.58, 1.58, 1.58], [9.0, 5.0, 1.0, 1.0, 1.2, 0.8]),
    "online_ce": _rl_history([1.2, 1.2, 1.2, 1.8, 1.9, 2.0], [9.0, 5.0, 1.5, 1.5, 1.5, 1.5]),
}


def test_strategies_summary():
    import scipy.stats
    out = strategies_summary(STUDY_HISTORY, num_draft=2)
    f, o = out["frozen"], out["online_ce"]
    assert f["mean_accepted_start"] == pytest.approx(1.6) and f["mean_accepted_end"] == pytest.approx(1.58)
    assert f["acceptance_start"] == pytest.approx(0.8) and f["acceptance_end"] == pytest.approx(0.79)
    assert f["train_seconds"] == pytest.approx(1.0) and f["train_cost_ratio"] == 1.0  # median past the compiles
    assert o["train_seconds"] == pytest.approx(1.5) and o["train_cost_ratio"] == pytest.approx(1.5)
    assert (f["entropy_start"], f["entropy_end"]) == (0.5, 0.4)
    assert o["last10_mean_accepted"] == [1.2, 1.2, 1.2, 1.8, 1.9, 2.0]
    p = scipy.stats.ttest_ind(o["last10_mean_accepted"], f["last10_mean_accepted"], equal_var=False).pvalue
    assert o["end_vs_frozen_pvalue"] == pytest.approx(p) and "end_vs_frozen_pvalue" not in f
    alone = strategies_summary({"online_ce": STUDY_HISTORY["online_ce"]}, num_draft=2)["online_ce"]
    assert alone["train_cost_ratio"] is None and "end_vs_frozen_pvalue" not in alone


def _pretrain_results():
    acc = lambda rej, greedy: {"rejection": {"1.0": {"mean_accepted": rej}}, "greedy": {"1.0": {"mean_accepted": greedy}}}
    tf = lambda v: {"1.0": {"mean_accepted": {"rejection": v}}}
    return {"num_draft": 2, "acceptance": {"ce": acc(1.0, 0.8), "kl": acc(1.2, 0.9), "e2e_tv": acc(1.4, 1.0)},
            "teacher_forced": {"ce": tf(0.9), "kl": tf(1.1), "e2e_tv": tf(1.3)}}


def test_losses_summary():
    import scipy.stats
    rows = {"ce": [1.0, 0.5, 0.7, 0.2, 0.9, 0.4], "e2e_tv": [1.3, 0.9, 0.6, 0.8, 1.4, 0.7]}
    out = losses_summary(_pretrain_results(), rows)
    assert out["temperature"] == "1.0" and out["num_draft"] == 2
    assert out["table"]["e2e_tv"] == {"accept_rate": 0.7, "greedy_accept_rate": 0.5,
                                      "teacher_forced_mean_accepted": 1.3}
    assert set(out["tests"]) == {"e2e_tv-ce"}  # no per-prompt rows for kl: no test
    t = out["tests"]["e2e_tv-ce"]
    diff = np.subtract(rows["e2e_tv"], rows["ce"])
    assert t["accept_rate_points"] == pytest.approx(20.0)
    assert t["teacher_forced_diff"] == pytest.approx(diff.mean()) and t["n_prompts"] == 6
    assert t["e2e_tv_better_on"] == 5
    assert t["paired_t_pvalue"] == pytest.approx(scipy.stats.ttest_rel(rows["e2e_tv"], rows["ce"]).pvalue)
    assert t["wilcoxon_pvalue"] == pytest.approx(scipy.stats.wilcoxon(diff).pvalue)


def _study_results(strategies):
    sweep = [dict(r, temperature=t, acceptance={"rejection": a, "greedy": a - 0.1})
             for r, t, a in [({"entropy": 0.1}, 0.5, 0.70), ({"entropy": 0.2}, 0.5, 0.72),
                             ({"entropy": 0.3}, 1.0, 0.80), ({"entropy": 0.4}, 1.0, 0.74)]]
    law = entropy_law(sweep)
    gaps = gap_vs_entropy(sweep)
    config = {"policy_dir": "P/policy", "pretrain_mtp_dir": "P", "num_draft": 2, "tasks": ["arithmetic"],
              "temperatures": [0.5, 1.0], "sweep_prompts": 8, "sweep_batch": 4, "alpha": 0.05,
              "rl": {"num_steps": 6}}
    return {"entropy_law": {m: law[m] for m in ("rejection", "greedy")}, "gap_summary": gap_summary(gaps),
            "sweep": sweep, "strategies": strategies_summary(strategies, 2),
            "losses": losses_summary(_pretrain_results(), {"ce": [1.0, 0.5, 0.7, 0.2, 0.9, 0.4],
                                                           "e2e_tv": [1.3, 0.9, 0.6, 0.8, 1.4, 0.7]}),
            "plots": {"entropy_law": "plots/entropy_law.png", "gap_vs_entropy": "plots/gap_vs_entropy.png",
                      "acceptance_through_rl": "plots/acceptance_through_rl.png"}, "config": config}


def test_write_report(tmp_path):
    r = _study_results(STUDY_HISTORY)
    text = write_report(r, tmp_path)
    assert (tmp_path / "report.md").read_text() == text == study_report(r)
    for heading in ("## 1.", "## 2.", "## 3.", "## 4."):
        assert heading in text
    assert "`P/policy`" in text and "GRPO for 6 steps" in text and "K = 2" in text
    assert "**Not reproduced to the R² ≥ 0.9 goal**" in text and why_not_linear(r["sweep"]) in text
    assert "| e2e_tv-ce | +20.0 |" in text and "| online_ce |" in text and "1.50x" in text
    assert ("**Reproduced**: the frozen heads' accept rate moved by -0.010 through RL, and no online strategy "
            "ended significantly higher.") in text
    assert "](plots/acceptance_through_rl.png)" in text
    # without a frozen arm: no cost ratio, no verdict on finding 4, and no crash
    alone = study_report(_study_results({"online_ce": STUDY_HISTORY["online_ce"]}))
    assert "| - | - |" in alone and "the frozen heads" not in alone


def test_why_not_linear_reads_its_numbers():
    text = why_not_linear(_study_results(STUDY_HISTORY)["sweep"])
    assert "0.10–0.40 nats" in text and "0.70–0.80" in text
    assert "0.710 at T = 0.5" in text and "0.770 at T = 1.0" in text and "0.610 at T = 0.5" in text
