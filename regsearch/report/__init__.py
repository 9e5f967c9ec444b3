"""A study's report, drawn from the Optuna storage alone: views of its trials, figures, one HTML file or PNG."""

from regsearch.report._figures import build_sections, warm_up
from regsearch.report._render import FORMATS, file_name, finished, render, write
from regsearch.report._views import Section, TrialView, pareto_front, summary_lines, top_table, trial_views

__all__ = ["FORMATS", "Section", "TrialView", "build_sections", "file_name", "finished", "pareto_front", "render",
           "summary_lines", "top_table", "trial_views", "warm_up", "write"]
