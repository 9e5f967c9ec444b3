"""The report's figures, drawn with matplotlib's object API (no pyplot: the caller's backend and figure registry
are left alone), each as PNG bytes in a `Section`."""

from __future__ import annotations

import io
import math
import textwrap
import warnings
from typing import Any

import optuna

from regsearch._ablate import ABLATION_ATTR, diverged_words
from regsearch._records import CONFIRM_ATTR
from regsearch.report._views import (
    Section,
    TrialView,
    as_number,
    complete_views,
    pareto_front,
    ranked_views,
    trial_views,
)

_WIDTH = 12.0
"""Figure width in inches (1200 px at the report's 100 dpi)."""
_DPI = 100
_COLORS = {"COMPLETE": "tab:blue", "PRUNED": "tab:orange", "FAIL": "tab:red"}


def new_figure(height: float, width: float = _WIDTH) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def png_bytes(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, facecolor="white")
    return buffer.getvalue()


def _drawn(section: Section, fig: Any) -> Section:
    """The section with its figure, titled, as PNG bytes."""
    fig.suptitle(section.title)
    section.png = png_bytes(fig)
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

    fig = new_figure(4.2)
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
    complete = sorted((v for v in complete_views(views) if v.feasible is not False), key=lambda v: v.number)
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
    fig = new_figure(1.2 + 0.32 * len(names))
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
    points = [v for v in complete_views(views) if v.gap_acc is not None]
    if not points:
        section.note = "No complete trial has both val_acc and gap_acc."
        return section
    front = pareto_front(views)
    fig = new_figure(5.0)
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
    chosen = ranked_views(views)[:3]
    chosen += [v for v in views if v.baseline and v not in chosen]
    chosen = [v for v in chosen if v.curve]
    if not chosen:
        section.note = "No curves: the trials hold no per-epoch metrics (user attributes 'curve.<epoch>')."
        return section
    axes = _panel_row(3.6, len(chosen))
    fig = axes[0].figure
    for ax, v in zip(axes, chosen):
        epochs = [c.get("epoch") for c in v.curve]
        for key, style in (("train_acc", "--"), ("val_acc", "-")):
            values = [as_number(c.get(key)) for c in v.curve]
            ax.plot(epochs, [math.nan if y is None else y for y in values], style,
                    color="tab:gray" if key == "train_acc" else "tab:blue", label=key)
        ax.set_title(f"trial {v.number}" + (" (baseline)" if v.baseline else f", val_acc {v.val_acc:.4f}"),
                     fontsize="medium")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    # the scale of the later epochs, where the gap between the curves shows; the first epochs may run below it
    late = [y for v in chosen for c in v.curve[len(v.curve) // 3:] for y in (as_number(c.get("train_acc")),
                                                                             as_number(c.get("val_acc")))
            if y is not None]
    if late:
        low, high = min(late), max(late)
        axes[0].set_ylim(low - max(high - low, 0.01) * 0.3, high + max(high - low, 0.01) * 0.15)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="lower right", fontsize="small")
    return _drawn(section, fig)


def _confirmation(study: optuna.Study) -> Section:
    section = Section("confirmation", "Confirmation of the finalists",
                      "Each finalist retrained with fresh seeds (or in k-fold cross-validation): every run's "
                      "validation accuracy (dots), their mean ± sd (bar) and the mean test accuracy (diamond, read "
                      "only); the winner, chosen on mean val_acc, is on top.")
    done = study.user_attrs.get(CONFIRM_ATTR)
    if not done or not done.get("rows"):
        section.note = (f"Not confirmed: `regsearch confirm --study {study.study_name}` retrains the finalists with "
                        f"fresh seeds and chooses on their mean.")
        return section
    rows = done["rows"]
    fig = new_figure(1.0 + 0.55 * len(rows))
    ax = fig.add_subplot()
    unlabelled = {"val_acc, mean ± sd", "test_acc, mean"}  # each legend entry once, on the first row that has it

    def label(text: str) -> str | None:
        if text not in unlabelled:
            return None
        unlabelled.remove(text)
        return text

    for y, r in enumerate(reversed(rows)):
        color = "tab:red" if r["winner"] else "tab:blue"
        runs = [v for v in r["val_acc"] if v is not None]
        ax.scatter(runs, [y] * len(runs), s=14, color=color, alpha=0.45, zorder=3)
        if r["val_acc_mean"] is not None:  # else every run of it diverged
            ax.errorbar([r["val_acc_mean"]], [y], xerr=[r["val_acc_sd"] or 0.0], fmt="o", color=color, capsize=4,
                        zorder=4, label=label("val_acc, mean ± sd"))
        if r.get("test_acc_mean") is not None:
            ax.scatter([r["test_acc_mean"]], [y], marker="D", s=36, color="tab:gray", zorder=4,
                       label=label("test_acc, mean"))
    labels = [f"{'* ' if r['winner'] else ''}trial {r['trial']} ({r['role']}): {r['config']}" for r in reversed(rows)]
    # two lines of 70 characters: a configuration's searched width or epochs come last and must show
    wrapped = [textwrap.wrap(label, 70) for label in labels]
    ax.set_yticks(range(len(rows)), ["\n".join(lines[:2]) + ("..." if len(lines) > 2 else "") for lines in wrapped],
                  fontsize="small")
    ax.set_xlabel("accuracy")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    section.note += " " + done.get("sentence", "") + (" " + done["ensemble"]["sentence"] if done.get("ensemble")
                                                      else "")
    return _drawn(section, fig)


def _ablation(study: optuna.Study) -> Section:
    section = Section("ablation", "What each regularizer is worth",
                      "Each regularizer of the confirmed winner: val_acc with it − without it, in points, as the mean "
                      "± sd of the runs' paired differences, removed from the winner (bar) and added alone to the "
                      "baseline (diamond); 'noise' where it is within noise (its sd, or one validation example).")
    done = study.user_attrs.get(ABLATION_ATTR)
    if not done or not done.get("rows"):
        section.note = (f"Not ablated: `regsearch confirm --study {study.study_name} --ablate` retrains the "
                        f"confirmed winner without each of its regularizers, and the baseline with each alone.")
        return section
    removed = [r for r in done["rows"] if r["direction"] == "removed"]
    added = {r["regularizer"]: r for r in done["rows"] if r["direction"] == "added"}
    fig = new_figure(1.2 + 0.6 * len(removed))
    ax = fig.add_subplot()
    for y, r in enumerate(reversed(removed)):
        mean, sd = 100 * (r["val_acc_effect_mean"] or 0.0), 100 * (r["val_acc_effect_sd"] or 0.0)
        color = {"helps": "tab:green", "hurts": "tab:red"}.get(r["verdict"], "tab:gray")
        ax.barh([y], [mean], height=0.5, xerr=[sd], color=color, alpha=0.7, capsize=5,
                label="removed from the winner" if y == 0 else None)
        other = added.get(r["regularizer"])
        if other is not None and other["val_acc_effect_mean"] is not None:
            ax.errorbar([100 * other["val_acc_effect_mean"]], [y + 0.35],
                        xerr=[100 * (other["val_acc_effect_sd"] or 0.0)], fmt="D", color="black", capsize=3,
                        label="added to the baseline" if y == 0 else None)
        for where, row in ((y, r), (y + 0.35, other)):
            if row is None:
                continue
            said = "noise" if row["verdict"] == "noise" else diverged_words(row)
            if said:
                ax.annotate(said, (100 * (row["val_acc_effect_mean"] or 0.0), where), xytext=(6, 4),
                            textcoords="offset points", fontsize="small", color="tab:gray")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(removed)), [r["regularizer"] for r in reversed(removed)])
    ax.set_xlabel("val_acc, with it − without it (points)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    section.note += " " + done.get("sentence", "")
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
    complete = complete_views(views)
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
    for group in sorted(groups, key=lambda g: (g in ("model", "training"), g)):  # the searched keys after the plugins
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
    return png_bytes(fig)


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
    fig = new_figure(2.0, width=3.0)
    ax = fig.add_subplot()
    ax.scatter([1.0, 10.0], [0.5, 0.6], label="a")
    ax.set_xscale("log")
    ax.set_title("a")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.suptitle("a")
    png_bytes(fig)


def _label(choice: Any) -> str:
    if isinstance(choice, bool):
        return "on" if choice else "off"
    return str(choice)


# --------------------------------------------------------------------------------------------------------------


def build_sections(study: optuna.Study) -> tuple[list[TrialView], list[Section]]:
    views = trial_views(study)
    return views, [_history(views, len(study.directions) > 1), _importance(study, views), _pareto(views),
                   _curves(views), _effects(views), _confirmation(study),
                   _ablation(study)]
