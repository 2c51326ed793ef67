"""Entropy / acceptance analysis: fits and the study's tests (numpy / scipy), plots
(matplotlib, Agg), and the study's report (``report``)."""

from bebop_jax.analysis.fits import (acceptance_through_training, entropy_law,
                                     gap_summary, gap_vs_entropy, linear_fit,
                                     losses_summary, strategies_summary)
from bebop_jax.analysis.plots import (plot_acceptance_through_training, plot_curves,
                                      plot_entropy_law, plot_gap_vs_entropy, save_figure)
from bebop_jax.analysis.report import study_report, why_not_linear, write_report

__all__ = [
    "linear_fit", "entropy_law", "gap_vs_entropy", "gap_summary",
    "acceptance_through_training", "strategies_summary", "losses_summary",
    "plot_entropy_law", "plot_gap_vs_entropy",
    "plot_acceptance_through_training", "plot_curves", "save_figure",
    "study_report", "write_report", "why_not_linear",
]
