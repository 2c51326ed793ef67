"""Entropy / acceptance analysis: fits (numpy) and plots (matplotlib, Agg)."""

from bebop_jax.analysis.fits import (acceptance_through_training, entropy_law,
                                     gap_summary, gap_vs_entropy, linear_fit)
from bebop_jax.analysis.plots import (plot_acceptance_through_training, plot_curves,
                                      plot_entropy_law, plot_gap_vs_entropy, save_figure)

__all__ = [
    "linear_fit", "entropy_law", "gap_vs_entropy", "gap_summary",
    "acceptance_through_training", "plot_entropy_law", "plot_gap_vs_entropy",
    "plot_acceptance_through_training", "plot_curves", "save_figure",
]
