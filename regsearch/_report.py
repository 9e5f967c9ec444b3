"""A study's report, drawn from the Optuna storage alone: one self-contained HTML file, or one PNG.

Everything comes from the trials' states, parameters and user attributes (`metrics`, `curve`, `baseline`) and
the study's `best_test`, so a report needs no MLflow. Figures are drawn with matplotlib's object API (no pyplot:
the caller's backend and figure registry are left alone) and embedded in the HTML as base64 PNG.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from regsearch._errors import ConfigError
from regsearch._records import (
    CURVE_ATTR,
    MAX_GAP_ATTR,
    METRIC_ATTR,
    TEST_ATTR,
    best_trial,
    is_baseline,
    is_feasible,
    is_surplus,
    nondominated,
    rank_key,
)

logger = logging.getLogger("regsearch")

FORMATS = ("html", "png")
_STATE = optuna.trial.TrialState
_WIDTH = 12.0
"""Figure width in inches (1200 px at the report's 100 dpi)."""
_DPI = 100
_COLORS = {"COMPLETE": "tab:blue", "PRUNED": "tab:orange", "FAIL": "tab:red"}


@dataclass
class TrialView:
    """What the report reads from one trial, the same for single- and multi-objective studies."""

    number: int
    state: str
    val_acc: float | None
    gap_acc: float | None
    train_acc: float | None
    params: dict[str, Any]
    distributions: dict[str, optuna.distributions.BaseDistribution]
    curve: list[dict[str, float]]
    baseline: bool
    test_acc: float | None
    """Only the baseline trial has its own test accuracy (the best trial's is the study's `best_test`)."""
    val_loss: float | None = None
    feasible: bool | None = None
    """Under a gap limit (`--max-gap`): whether gap_acc <= the limit; None where the study has no limit."""


@dataclass
class Section:
    """One part of the report: an anchor, a title, a line saying what is drawn (or why nothing is), a figure."""

    key: str
    title: str
    note: str
    png: bytes | None = None
    children: list[Section] = field(default_factory=list)


def trial_views(study: optuna.Study) -> list[TrialView]:
    """Every trial that ran, its accuracies from the `metrics` user attribute (objective values as a fallback)."""
    multi = len(study.directions) > 1
    max_gap = study.user_attrs.get(MAX_GAP_ATTR)
    views = []
    for t in study.get_trials(deepcopy=False):
        if is_surplus(t):
            continue  # asked for after the study had its total (a race between workers): never trained
        metrics = t.user_attrs.get(METRIC_ATTR) or {}
        val, gap = metrics.get("val_acc"), metrics.get("gap_acc")
        if t.state == _STATE.COMPLETE and t.values:
            val = val if val is not None else t.values[0]
            if multi and gap is None and len(t.values) > 1:
                gap = t.values[1]
        views.append(TrialView(t.number, t.state.name, _number(val), _number(gap), _number(metrics.get("train_acc")),
                               dict(t.params), dict(t.distributions), list(t.user_attrs.get(CURVE_ATTR) or []),
                               is_baseline(t), _number(t.user_attrs.get("test_acc")), _number(metrics.get("val_loss"))))
        if max_gap is not None:
            views[-1].feasible = is_feasible(t)
    return views


def _number(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _complete(views: list[TrialView]) -> list[TrialView]:
    return [v for v in views if v.state == "COMPLETE" and v.val_acc is not None]


def pareto_front(views: list[TrialView]) -> list[TrialView]:
    """The complete trials no other beats on both validation accuracy (higher) and gap (lower), by gap."""
    points = [v for v in _complete(views) if v.gap_acc is not None]
    return sorted(nondominated(points, lambda v: v.val_acc, lambda v: v.gap_acc), key=lambda v: (v.gap_acc, v.val_acc))


def _ranked(views: list[TrialView]) -> list[TrialView]:
    """Complete trials, best first, as `optimize` and `show` rank them (`_records.rank_key`)."""
    return sorted(_complete(views), key=lambda v: rank_key(v.val_acc, v.val_loss, v.feasible, v.number))


# --------------------------------------------------------------------------------------------------------------
# figures


def _figure(height: float, width: float = _WIDTH) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, facecolor="white")
    return buffer.getvalue()


def _drawn(section: Section, fig: Any) -> Section:
    """The section with its figure, titled, as PNG bytes."""
    fig.suptitle(section.title)
    section.png = _png(fig)
    return section


def _history(views: list[TrialView], multi: bool) -> Section:
    section = Section("history", "Optimisation history",
                      "Validation accuracy of each trial (pruned trials: where they stopped; failed trials have none "
                      "and sit on the bottom edge), with the best complete trial so far.")
    valued = [v for v in views if v.val_acc is not None]
    if not valued:
        section.note = "No trial has a validation accuracy yet."
        return section
    from matplotlib.ticker import MaxNLocator

    fig = _figure(4.2)
    ax = fig.add_subplot()
    lo, hi = min(v.val_acc for v in valued), max(v.val_acc for v in valued)
    pad = max((hi - lo) * 0.08, 0.005)
    floor = lo - pad
    complete_pts = [v for v in valued if v.state == "COMPLETE"]
    pruned_pts = [v for v in valued if v.state == "PRUNED"]
    if complete_pts:
        ax.scatter([v.number for v in complete_pts], [v.val_acc for v in complete_pts], s=36, label="complete",
                   color=_COLORS["COMPLETE"], zorder=3)
    if pruned_pts:
        ax.scatter([v.number for v in pruned_pts], [v.val_acc for v in pruned_pts], s=36, label="pruned",
                   facecolors="none", edgecolors=_COLORS["PRUNED"], zorder=3)
    failed = [v for v in views if v.state == "FAIL"]
    if failed:
        ax.scatter([v.number for v in failed], [floor] * len(failed), marker="x", color=_COLORS["FAIL"], s=40,
                   label="failed", zorder=3, clip_on=False)
    complete = sorted((v for v in _complete(views) if v.feasible is not False), key=lambda v: v.number)
    constrained = any(v.feasible is not None for v in views)
    if complete:
        best, line = -math.inf, []
        for v in complete:
            best = max(best, v.val_acc)
            line.append(best)
        last = max(v.number for v in views)
        ax.step([v.number for v in complete] + [last], line + [line[-1]], where="post", color="tab:green",
                label=("best feasible val_acc so far" if constrained else "best val_acc so far")
                + (" (one of the objectives)" if multi else ""), zorder=2)
    for v in views:
        if v.baseline and v.val_acc is not None:
            ax.scatter([v.number], [v.val_acc], s=220, marker="*", color="gold", edgecolors="black", zorder=4,
                       label="baseline (no regularization)")
            ax.annotate("baseline", (v.number, v.val_acc), textcoords="offset points", xytext=(8, -12))
    ax.set_ylim(floor - pad * 0.3, hi + pad)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("val_acc")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")  # outside: never over a point
    return _drawn(section, fig)


def _importance(study: optuna.Study, views: list[TrialView]) -> Section:
    multi = len(study.directions) > 1
    goal = "reaching the Pareto front of val_acc and gap_acc" if multi else "reaching the top val_acc"
    section = Section("importance", "Parameter importance",
                      f"PED-ANOVA (Optuna's default evaluator): how much each parameter matters for {goal}, "
                      f"over the complete trials; a regularizer's own parameters are judged on the trials where it "
                      f"was on.")
    complete = [v for v in views if v.state == "COMPLETE"]
    if len(complete) < 2:
        section.note = (f"Not computed: parameter importance needs at least 2 complete trials; the study has "
                        f"{len(complete)}.")
        return section
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            importances = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
        except Exception as exc:
            section.note = f"Not computed: Optuna's importance evaluator failed: {type(exc).__name__}: {exc}"
            return section
    equal = [str(w.message) for w in caught if "will be equal" in str(w.message)]
    if equal:
        section.note = f"Not computed: {equal[0]} ({len(complete)} complete trials)."
        return section
    if not importances:
        section.note = "Not computed: the study searched no parameters."
        return section
    names = sorted(importances, key=lambda n: (-importances[n], n))[::-1]  # the most important on top; ties by name
    fig = _figure(1.2 + 0.32 * len(names))
    ax = fig.add_subplot()
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    for y, n in enumerate(names):
        ax.text(importances[n], y, f" {importances[n]:.2f}", va="center", fontsize="small")
    ax.set_xlabel("importance (sums to 1)")
    ax.set_xlim(0, max(importances.values()) * 1.15 or 1)
    ax.grid(axis="x", alpha=0.3)
    return _drawn(section, fig)


def _pareto(views: list[TrialView]) -> Section:
    section = Section("pareto", "Validation accuracy vs generalization gap",
                      "Complete trials: val_acc (higher is better) against gap_acc = train_acc - val_acc (lower is "
                      "better, both in eval mode); the line is the Pareto front, the trials no other beats on both.")
    points = [v for v in _complete(views) if v.gap_acc is not None]
    if not points:
        section.note = "No complete trial has both val_acc and gap_acc."
        return section
    front = pareto_front(views)
    fig = _figure(5.0)
    ax = fig.add_subplot()
    ax.scatter([v.gap_acc for v in points], [v.val_acc for v in points], s=30, color="tab:blue", alpha=0.6,
               label="complete trial")
    ax.step([v.gap_acc for v in front], [v.val_acc for v in front], where="post", color="tab:red", zorder=3)
    ax.scatter([v.gap_acc for v in front], [v.val_acc for v in front], s=60, color="tab:red", zorder=4,
               label="Pareto front")
    at: dict[tuple[float, float], list[str]] = {}
    for v in front:  # trials that ended on the same point share one label
        at.setdefault((v.gap_acc, v.val_acc), []).append(str(v.number))
    for (gap, val), numbers in at.items():
        ax.annotate("trial " + ", ".join(numbers), (gap, val), textcoords="offset points", xytext=(6, 4),
                    fontsize="small")
    for v in points:
        if v.baseline:
            ax.scatter([v.gap_acc], [v.val_acc], s=220, marker="*", color="gold", edgecolors="black", zorder=5,
                       label="baseline (no regularization)")
    ax.set_xlabel("gap_acc (train_acc - val_acc), lower is better")
    ax.set_ylabel("val_acc, higher is better")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")  # outside: never over a point
    return _drawn(section, fig)


def _curves(views: list[TrialView]) -> Section:
    section = Section("curves", "Learning curves",
                      "Training (dashed) and validation (solid) accuracy per epoch, both measured in eval mode, for "
                      "the best 3 complete trials and the baseline; the scale is that of the later epochs.")
    chosen = _ranked(views)[:3]
    chosen += [v for v in views if v.baseline and v not in chosen]
    chosen = [v for v in chosen if v.curve]
    if not chosen:
        section.note = "No curves: the trials hold no per-epoch metrics (user attribute 'curve')."
        return section
    axes = _panel_row(3.6, len(chosen))
    fig = axes[0].figure
    for ax, v in zip(axes, chosen):
        epochs = [c.get("epoch") for c in v.curve]
        for key, style in (("train_acc", "--"), ("val_acc", "-")):
            values = [_number(c.get(key)) for c in v.curve]
            ax.plot(epochs, [math.nan if y is None else y for y in values], style, color="tab:gray" if key == "train_acc"
                    else "tab:blue", label=key)
        ax.set_title(f"trial {v.number}" + (" (baseline)" if v.baseline else f", val_acc {v.val_acc:.4f}"),
                     fontsize="medium")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    # the scale of the later epochs, where the gap between the curves shows; the first epochs may run below it
    late = [y for v in chosen for c in v.curve[len(v.curve) // 3:] for y in (_number(c.get("train_acc")),
                                                                             _number(c.get("val_acc")))
            if y is not None]
    if late:
        low, high = min(late), max(late)
        axes[0].set_ylim(low - max(high - low, 0.01) * 0.3, high + max(high - low, 0.01) * 0.15)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="lower right", fontsize="small")
    return _drawn(section, fig)


def _group(param: str) -> str:
    """The regularizer (or 'training', or 'choice <group>') a parameter belongs to."""
    if param.startswith("choice."):
        return "choice " + param[len("choice."):]
    return param.split(".", 1)[0] if "." in param else "training"


def _effects(views: list[TrialView]) -> Section:
    section = Section("effects", "Effect of each regularizer",
                      "For each regularizer: val_acc (top) and gap_acc (bottom) of the complete trials against each "
                      "of its parameters (a parameter only where the regularizer was on), and on against off.")
    complete = _complete(views)
    dists: dict[str, optuna.distributions.BaseDistribution] = {}
    for v in complete:
        for name, dist in v.distributions.items():
            dists.setdefault(name, dist)
    if not dists:
        section.note = "No complete trial with searched parameters."
        return section
    groups: dict[str, list[str]] = {}
    for name in sorted(dists, key=lambda n: (not n.endswith(".enabled"), n)):
        groups.setdefault(_group(name), []).append(name)
    for group in sorted(groups, key=lambda g: (g == "training", g)):
        params = groups[group]
        child = Section(f"effect-{group.replace(' ', '-')}", group, "")
        child.png = _effect_figure(group, params, dists, complete)
        section.children.append(child)
    return section


def _effect_figure(group: str, params: list[str], dists: dict[str, Any], complete: list[TrialView]) -> bytes:
    import numpy as np
    from matplotlib.ticker import MaxNLocator, NullLocator

    columns = min(len(params), 4)
    blocks = math.ceil(len(params) / columns)
    grid = _panel_grid(blocks, columns)
    fig = grid[0][0].figure
    jitter = np.random.default_rng(0)  # spreads points of one category sideways; fixed, so reports are stable
    for i, name in enumerate(params):
        block, col = divmod(i, columns)
        dist = dists[name]
        seen = [v for v in complete if name in v.params]
        for row, metric in enumerate(("val_acc", "gap_acc")):
            ax = grid[2 * block + row][col]
            ys = [getattr(v, metric) for v in seen]
            keep = [(v.params[name], y) for v, y in zip(seen, ys) if y is not None]
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                choices = list(dist.choices)
                labels = []
                for k, choice in enumerate(choices):
                    at = [y for x, y in keep if x == choice]
                    labels.append(f"{_label(choice)}\n(n={len(at)})")
                    if at:
                        ax.scatter(k + jitter.uniform(-0.12, 0.12, len(at)), at, s=22, alpha=0.7, color="tab:blue")
                        ax.hlines(sum(at) / len(at), k - 0.3, k + 0.3, color="tab:red", linewidth=2)
                ax.set_xticks(range(len(choices)), labels if row == 1 else [""] * len(choices))
                ax.set_xlim(-0.6, len(choices) - 0.4)
            else:
                ax.scatter([x for x, _ in keep], [y for _, y in keep], s=22, alpha=0.7, color="tab:blue")
                if getattr(dist, "log", False):
                    ax.set_xscale("log")
                    ax.xaxis.set_minor_locator(NullLocator())  # dozens of unlabelled marks per panel, each drawn
                if row == 0:
                    ax.tick_params(labelbottom=False)
            if row == 0:
                ax.set_title(name, fontsize="medium")
            else:
                ax.set_xlabel(name if not isinstance(dist, optuna.distributions.CategoricalDistribution) else "")
            if col == 0:
                ax.set_ylabel(metric)
            ax.yaxis.set_major_locator(MaxNLocator(nbins=4))
            ax.grid(alpha=0.3)
    for j in range(len(params), blocks * columns):
        block, col = divmod(j, columns)
        grid[2 * block][col].set_visible(False)
        grid[2 * block + 1][col].set_visible(False)
    fig.suptitle(f"{group} (red line: mean)" if any(isinstance(dists[p], optuna.distributions.CategoricalDistribution)
                                                  for p in params) else group)
    return _png(fig)


def _panel_row(height: float, panels: int) -> list[Any]:
    """A row of `panels` axes sharing their y axis across the report's width, spaced in fixed inches."""
    from matplotlib.figure import Figure

    left, right, top, bottom, between = 0.8, 0.15, 0.75, 0.55, 0.3  # y labels; -; titles; x labels; -
    fig = Figure(figsize=(_WIDTH, height), dpi=_DPI)
    cell = (_WIDTH - left - right - (panels - 1) * between) / panels
    grid = fig.add_gridspec(1, panels, left=left / _WIDTH, right=1 - right / _WIDTH, bottom=bottom / height,
                            top=1 - top / height, wspace=between / cell)
    return list(grid.subplots(sharey=True, squeeze=False)[0])


def _panel_grid(blocks: int, columns: int) -> list[list[Any]]:
    """Axes for `blocks` rows of `columns` two-panel (val_acc over gap_acc) cells, the same size in every group.

    The spacing is fixed in inches rather than left to a layout engine, which drew these many-panel figures twice
    over (the effect figures were most of a report's drawing time).
    """
    from matplotlib.figure import Figure

    width, height = max(3.0 * columns, 4.5), 0.5 + 3.6 * blocks
    left, right, top, bottom = 1.0, 0.15, 0.75, 0.8  # y labels; -; the figure's and the panels' titles; x labels
    between_blocks, in_block, between_columns = 1.1, 0.2, 0.8
    fig = Figure(figsize=(width, height), dpi=_DPI)
    cell_h = (height - top - bottom - (blocks - 1) * between_blocks) / blocks
    cell_w = (width - left - right - (columns - 1) * between_columns) / columns
    outer = fig.add_gridspec(blocks, 1, left=left / width, right=1 - right / width, bottom=bottom / height,
                             top=1 - top / height, hspace=between_blocks / cell_h)
    grid = []
    for block in range(blocks):
        inner = outer[block].subgridspec(2, columns, hspace=in_block / ((cell_h - in_block) / 2),
                                         wspace=between_columns / cell_w)
        grid += [[fig.add_subplot(inner[row, col]) for col in range(columns)] for row in range(2)]
    return grid


def warm_up() -> None:
    """Draw a small figure with what the report's figures use, so that the first report draws at full speed."""
    fig = _figure(2.0, width=3.0)
    ax = fig.add_subplot()
    ax.scatter([1.0, 10.0], [0.5, 0.6], label="a")
    ax.set_xscale("log")
    ax.set_title("a")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.suptitle("a")
    _png(fig)


def _label(choice: Any) -> str:
    if isinstance(choice, bool):
        return "on" if choice else "off"
    return str(choice)


# --------------------------------------------------------------------------------------------------------------
# the header and the whole report


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"
    return str(value)


def summary_lines(study: optuna.Study, views: list[TrialView], top: int = 5) -> list[str]:
    """The header as text: counts by state, the best trial and its test accuracy, the baseline."""
    counts: dict[str, int] = {}
    for v in views:
        counts[v.state] = counts.get(v.state, 0) + 1
    directions = ", ".join(d.name.lower() for d in study.directions)
    lines = ["trials: " + (", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "none"),
             "objective: " + ("val_acc (maximize)" if len(study.directions) == 1
                              else f"Pareto front of val_acc and gap_acc ({directions})")
             + (f", subject to gap_acc <= {study.user_attrs[MAX_GAP_ATTR]:g}"
                if study.user_attrs.get(MAX_GAP_ATTR) is not None else "")]
    best = _best(study, views)
    test = study.user_attrs.get(TEST_ATTR) or {}
    if best is not None:
        line = f"best trial {best.number}: val_acc {_fmt(best.val_acc)}, gap_acc {_fmt(best.gap_acc)}"
        if test.get("trial") == best.number and test.get("test_acc") is not None:
            line += f", test accuracy {_fmt(test['test_acc'])} (test split, evaluated once)"
        lines.append(line)
    if test and (best is None or test.get("trial") != best.number) and test.get("test_acc") is not None:
        lines.append(f"test accuracy of trial {test.get('trial')}: {_fmt(test['test_acc'])}")
    for v in views:
        if v.baseline:
            lines.append(f"baseline (no regularization) trial {v.number}: {v.state.lower()}, val_acc "
                         f"{_fmt(v.val_acc)}, gap_acc {_fmt(v.gap_acc)}"
                         + (f", test accuracy {_fmt(v.test_acc)}" if v.test_acc is not None else ""))
    return lines


def _best(study: optuna.Study, views: list[TrialView]) -> TrialView | None:
    """The trial `optimize` tests and logs (`_records.best_trial`), as the report sees it."""
    best = best_trial(study)
    return None if best is None else next((v for v in views if v.number == best.number), None)


def top_table(views: list[TrialView], top: int = 5) -> str:
    """The best complete trials as a plain-text table."""
    rows = _ranked(views)[:top]
    if not rows:
        return "no complete trials"
    constrained = any(v.feasible is not None for v in rows)
    out = [f"{'trial':>5}  {'val_acc':>7}  {'gap_acc':>7}  {'train_acc':>9}  {'feasible  ' if constrained else ''}params"]
    for v in rows:
        params = " ".join(f"{k}={f'{p:.3g}' if isinstance(p, float) else _fmt(p)}"
                          for k, p in sorted(v.params.items()) if not (k.endswith(".enabled") and not p))
        mark = f"{'yes' if v.feasible else 'no':<8}  " if constrained else ""
        out.append(f"{v.number:>5}  {_fmt(v.val_acc):>7}  {_fmt(v.gap_acc):>7}  {_fmt(v.train_acc):>9}  {mark}"
                   f"{params}{'  (baseline)' if v.baseline else ''}")
    return "\n".join(out)


def build_sections(study: optuna.Study) -> tuple[list[TrialView], list[Section]]:
    views = trial_views(study)
    return views, [_history(views, len(study.directions) > 1), _importance(study, views), _pareto(views),
                   _curves(views), _effects(views)]


def finished(study: optuna.Study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state in (_STATE.COMPLETE, _STATE.PRUNED))


def render(study: optuna.Study, fmt: str = "html") -> bytes:
    """The report of `study` as the bytes of an HTML file or of a PNG image."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown report format {fmt!r}; known: {', '.join(FORMATS)}")
    if not finished(study):
        raise ConfigError(f"study {study.study_name!r} has no finished trials to report on")
    views, sections = build_sections(study)
    header = summary_lines(study, views)
    table = top_table(views)
    if fmt == "png":
        return _stacked_png(study.study_name, header, table, sections)
    return _html(study.study_name, header, table, sections).encode("utf-8")


def _img(section: Section) -> str:
    if section.png is None:
        return ""
    data = base64.b64encode(section.png).decode("ascii")
    return f'<img alt="{html.escape(section.title)}" src="data:image/png;base64,{data}">'


_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1240px;margin:1.5em auto;padding:0 1em;color:#222}"
          "img{max-width:100%;height:auto;display:block;margin:.5em 0 1.5em}"
          "pre{background:#f5f5f5;padding:.7em;overflow-x:auto;font-size:.85em}"
          ".note{color:#555;max-width:60em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em}")


def _html(name: str, header: list[str], table: str, sections: list[Section]) -> str:
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>regsearch report: {html.escape(name)}</title>",
        f"<style>{_STYLE}</style>",
        "</head>", "<body>",
        f'<header id="summary"><h1>regsearch report: {html.escape(name)}</h1>',
        "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in header) + "</ul>",
        f"<h3>Top trials</h3><pre>{html.escape(table)}</pre></header>",
    ]
    for s in sections:
        parts.append(f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>')
        parts.append(f'<p class="note">{html.escape(s.note)}</p>{_img(s)}')
        for child in s.children:
            parts.append(f'<section id="{child.key}"><h3>{html.escape(child.title)}</h3>{_img(child)}</section>')
        parts.append("</section>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _text_png(title: str, lines: list[str], mono: str = "") -> bytes:
    """A figure holding only text (the header, or a section that has no figure), for the single-PNG report."""
    rows = len(lines) + (mono.count("\n") + 2 if mono else 0)
    fig = _figure(0.9 + 0.22 * rows)
    fig.text(0.01, 1 - 0.35 / fig.get_figheight(), title, fontsize="x-large", weight="bold", va="top")
    text = "\n".join(lines)
    mono = "\n".join(line if len(line) <= 170 else line[:167] + "..." for line in mono.splitlines())
    fig.text(0.01, 1 - 0.75 / fig.get_figheight(), text, va="top", fontsize="medium")
    if mono:
        y = 1 - (0.85 + 0.22 * (len(lines) + 0.5)) / fig.get_figheight()
        fig.text(0.01, y, mono, va="top", family="monospace", fontsize="small")
    fig.set_layout_engine("none")
    return _png(fig)


def _stacked_png(name: str, header: list[str], table: str, sections: list[Section]) -> bytes:
    from PIL import Image

    pngs = [_text_png(f"regsearch report: {name}", header, table)]
    for s in sections:
        if s.png is not None:
            pngs.append(s.png)
        elif not s.children:
            pngs.append(_text_png(s.title, [s.note]))
        pngs += [c.png for c in s.children if c.png is not None]
    images = [Image.open(io.BytesIO(p)).convert("RGB") for p in pngs]
    sheet = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    y = 0
    for image in images:
        sheet.paste(image, (0, y))
        y += image.height
    buffer = io.BytesIO()
    # an adaptive 256-colour palette: line plots lose nothing visible, the file shrinks about 3x
    sheet.quantize(colors=256).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def file_name(study_name: str, fmt: str = "html") -> str:
    """`<study>-report.<fmt>`, with any character that could leave the folder replaced."""
    safe = re.sub(r"[^\w.-]", "_", study_name).lstrip(".") or "study"
    return f"{safe}-report.{fmt}"


def write(study: optuna.Study, path: str | os.PathLike[str], fmt: str = "html") -> Path:
    """Render the report and write it to `path` (replacing the file whole, never leaving half of one)."""
    path = Path(path)
    data = render(study, fmt)
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ConfigError(f"cannot write the report to {path}: {exc.strerror or exc}") from None
    return path


# --------------------------------------------------------------------------------------------------------------
# MLflow


def log_to_parent_run(study: optuna.Study, path: str | os.PathLike[str], tracking_uri: str) -> str | None:
    """Log the report file as an artifact of the study's MLflow parent run; its id, or None after one warning.

    A missing store, a store without the study's parent run, or one that does not answer is not an error: the
    report file is there anyway. A local SQLite store that does not exist is not created.
    """
    from regsearch._errors import StorageError
    from regsearch._storage import mask_url
    from regsearch._tracking import PARENT_RUN_ATTR, _local_tracking_path, check_tracking_uri, error_gist

    where = f"MLflow ({mask_url(tracking_uri)})"
    local = _local_tracking_path(tracking_uri)
    if local is not None and not local[0].exists():
        logger.warning("%s: no tracking store there; the report is not logged to MLflow", where)
        return None
    try:
        check_tracking_uri(tracking_uri)
    except StorageError as exc:
        logger.warning("%s: cannot use the tracking store (%s); the report is not logged to MLflow", where, exc)
        return None
    # an unreachable server must cost seconds, not MLflow's default minutes of retries (as for a study)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
        experiment = client.get_experiment_by_name(study.study_name)
        run = _run(client, run_id) if run_id and experiment is not None else None
        if run is None or run.info.experiment_id != experiment.experiment_id or run.info.lifecycle_stage != "active":
            logger.warning("%s: study %s has no parent run in this store; the report is not logged to MLflow", where,
                           study.study_name)
            return None
        client.log_artifact(run_id, str(path))
    except Exception as exc:
        logger.warning("%s: the report was not logged to MLflow: %s", where, error_gist(exc))
        return None
    return run_id


def _run(client: Any, run_id: str) -> Any:
    """The run, or None when the store does not hold it (the study ran against another store)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if exc.get_http_status_code() == 404:
            return None
        raise
