"""The `regsearch` command line. Errors become one line and an exit code here, and only here."""

from __future__ import annotations

import logging
import math
import os
import select
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from regsearch._errors import RegsearchError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


class _Failure(click.ClickException):
    """One line on stderr and the error's exit code (2 for bad input, 1 for run-time failures)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class RegsearchGroup(click.Group):
    """Maps regsearch's errors to exit codes in one place; tracebacks only with --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            # bad input is one line, as everywhere else: no "Usage: ... / Try ... for help." banner
            raise _Failure(exc.format_message(), exc.exit_code) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            if ctx.meta.get("debug"):
                raise
            # the shell's convention: 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM)
            signum = _signal_received or signal.SIGINT
            raise _Failure(f"interrupted{' by SIGTERM' if signum == signal.SIGTERM else ''}; rerun the same "
                           f"command to resume", 128 + signum) from None
        except RegsearchError as exc:
            if ctx.meta.get("debug"):
                raise
            raise _Failure(str(exc), exc.exit_code) from None
        except Exception as exc:
            if isinstance(exc, BrokenPipeError) and _stdout_closed():
                # output piped into `head` and closed early: not an error; nothing more is written to the pipe
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                raise click.exceptions.Exit(0) from None
            if ctx.meta.get("debug"):
                raise
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise _Failure(f"internal error: {type(exc).__name__}: {text} (rerun with --debug for the traceback)",
                           1) from None


def _stdout_closed() -> bool:
    """Whether standard output's reader went away (a broken pipe elsewhere, say to a server, is a real error)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or no real file behind stdout
        return False


class _Seconds(click.FloatRange):
    """A positive, finite number of seconds: click's range, which lets nan through, and infinity refused."""

    name = "float"

    def __init__(self) -> None:
        super().__init__(min=0, min_open=True)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{value} is not in the range x>0", param, ctx)
        if math.isinf(number):
            self.fail("must be finite; got inf (leave it out for no limit)", param, ctx)
        return number


class _Count(click.IntRange):
    """A whole number with a lower bound, said as click says it ("0 is not in the range x>=1")."""

    name = "integer"


POSITIVE = _Count(min=1)


def _search_key(key: str) -> Callable:
    """Check an option that sets a study-file key `search.<key>` exactly as the study file's value is checked."""
    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        from regsearch._spec import search_value

        return value if value is None else search_value(key, value, f"--{key.replace('_', '-')}")
    return check


def _key_value(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[tuple[str, str]]:
    pairs = []
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE (e.g. training.epochs=5); got {item!r}")
        pairs.append((key.strip(), value))
    return pairs


study_option = click.option("--study", "study", required=True, metavar="NAME_OR_PATH",
                            help="A stored study's name, a shipped study's name (see `regsearch studies`) or a "
                                 "study file's path.")
storage_option = click.option("--storage", metavar="URL",
                              help="Optuna storage: a journal file path (default ./regsearch.journal), "
                                   "sqlite:///FILE or postgresql://USER@HOST/DB.")
plugin_option = click.option("--plugin", "plugins", multiple=True, metavar="PATH.py",
                             type=click.Path(dir_okay=False), help="Load regularizers from a file (repeatable).")
study_name_option = click.option("--study-name", metavar="NAME",
                                 help="Name of the study in the storage (default: the study file's name).")
set_option = click.option("--set", "overrides", multiple=True, callback=_key_value, metavar="KEY=VALUE",
                          help="Override a study-file key, e.g. --set training.epochs=5 (repeatable).")
data_dir_option = click.option("--data-dir", type=click.Path(), metavar="PATH",
                               help="Local dataset copy (CIFAR-10 archive or folder).")
tracking_uri_option = click.option("--tracking-uri", metavar="URI",
                                   help="MLflow tracking URI (default: sqlite:///mlflow.db here).")


def _check_locations(storage: str | None, tracking_uri: str | None) -> None:
    """Refuse a local storage or tracking file that cannot be written, before any data is loaded.

    A missing or read-only folder, a device such as /dev/full or a full disk would otherwise fail later (after
    the data is loaded, or in the middle of the first trial) or, for a read-only SQLite file, after two minutes
    of MLflow retrying.
    """
    from regsearch._errors import StorageError
    from regsearch._storage import DEFAULT_STORAGE, mask_url, url_scheme
    from regsearch.tracking import check_tracking_uri, default_tracking_uri, local_store_problem, sqlite_path

    url = storage or DEFAULT_STORAGE
    if "://" not in url:
        if not os.path.isdir(url):  # a folder gets its own message (with a suggested file) from the storage
            problem = local_store_problem(url)
            if problem:
                raise StorageError(f"--storage {url}: {problem}")
    elif url_scheme(url) == "sqlite":
        path = sqlite_path(url)
        problem = local_store_problem(path) if path is not None else None
        if problem:
            raise StorageError(f"--storage {mask_url(url)}: cannot open the database: {problem}")
    uri = tracking_uri or default_tracking_uri()
    try:
        check_tracking_uri(uri)
    except StorageError as exc:
        raise StorageError(f"--tracking-uri {mask_url(uri)}: cannot use the MLflow tracking store: {exc}") from None


@click.group(cls=RegsearchGroup, context_settings=CONTEXT)
@click.option("--debug", is_flag=True, help="Show tracebacks and library logs.")
@click.version_option(package_name="regsearch")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Search combinations of regularizers for a neural network with Optuna; every trial tracked in MLflow."""
    ctx.meta["debug"] = debug
    from regsearch._logs import log_to_stderr

    log_to_stderr(logging.DEBUG if debug else logging.INFO)


@cli.command()
def studies() -> None:
    """List the shipped studies with their descriptions."""
    from regsearch._study_file import available_studies, describe

    found = available_studies()
    width = max((len(n) for n in found), default=0)
    for name, path in found.items():
        click.echo(f"{name:<{width}}  {describe(path)}")


@cli.command()
@plugin_option
def plugins(plugins: tuple[str, ...]) -> None:
    """List the registered regularizers, where each came from and its search space."""
    from regsearch._introspect import search_space_lines
    from regsearch._registry import default_registry

    registry = default_registry()
    for path in plugins:
        registry.load_file(path)
    for info in registry:
        click.echo(f"{info.name}  [{info.source}]")
        click.echo(f"    {info.description}")
        for line in search_space_lines(info):
            click.echo(f"    {line}")


@cli.command()
@study_option
@click.option("--n-trials", type=POSITIVE, metavar="N",
              help="The study's total number of finished trials (across resumes and workers); default: the "
                   "study file's search.n_trials, or no limit when --timeout is given.")
@click.option("--timeout", type=_Seconds(), metavar="SECONDS",
              help="Stop starting new trials after this many seconds (alone, it replaces the study file's "
                   "trial count: search until then).")
@storage_option
@tracking_uri_option
@study_name_option
@data_dir_option
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True)
@click.option("--seed", type=int, help="The study's seed (overrides the study file's).")
@set_option
@plugin_option
@click.option("--workers", type=POSITIVE, default=1, show_default=True, metavar="N",
              help="Worker processes on this machine sharing the study (torch threads are split among them).")
@click.option("--objective", callback=_search_key("objective"), metavar="val_acc|pareto",
              help="val_acc: maximize it (default); pareto: maximize val_acc and minimize gap_acc, no pruning "
                   "(the study file's search.objective).")
@click.option("--max-gap", type=float, callback=_search_key("max_gap"), metavar="X",
              help="The best trial must have gap_acc <= X, 0 <= X <= 1 (the study file's search.max_gap).")
@click.option("--register-model", callback=_search_key("register_model"), metavar="NAME",
              help="Register the logged best model in the MLflow Model Registry as NAME, a new version per study "
                   "run (the study file's search.register_model).")
def optimize(study: str, n_trials: int | None, timeout: float | None, storage: str | None,
             tracking_uri: str | None, study_name: str | None, data_dir: str | None, device: str,
             seed: int | None, overrides: list[tuple[str, str]], plugins: tuple[str, ...], workers: int,
             objective: str | None, max_gap: float | None, register_model: str | None) -> None:
    """Run or resume a study; rerunning the same command adds only the missing trials (with --timeout alone:
    searches for that long again)."""
    from regsearch._errors import ConfigError

    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available here (use --device auto or cpu)")
    if device == "mps":
        import torch

        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError("--device mps: no MPS device is available here (use --device auto or cpu)")
    _check_locations(storage, tracking_uri)
    import optuna

    from regsearch._study import optimize as run
    from regsearch.cli._display import TqdmProgress, print_leaderboard, print_mlflow_links

    debug = click.get_current_context().meta.get("debug")
    optuna.logging.set_verbosity(optuna.logging.INFO if debug else optuna.logging.ERROR)
    result = run(study, n_trials=n_trials, timeout=timeout, storage=storage, tracking_uri=tracking_uri,
                 study_name=study_name, data_dir=data_dir, device=device, seed=seed, overrides=overrides,
                 plugins=plugins, progress=TqdmProgress(), workers=workers, objective=objective, max_gap=max_gap,
                 verbose=bool(debug), register_model=register_model)
    print_leaderboard(result)
    print_mlflow_links(result, tracking_uri)


@cli.command()
@study_option
@storage_option
@study_name_option
@click.option("--top", type=POSITIVE, default=None,
              help="Rows to show (default: 10; a pareto study: its whole front).")
def show(study: str, storage: str | None, study_name: str | None, top: int) -> None:
    """Print the leaderboard of a stored study."""
    import optuna

    from regsearch._opening import load_stored_study
    from regsearch.cli._display import print_leaderboard

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    print_leaderboard(load_stored_study(study, storage, study_name), top=top or 10, front_top=top)


@cli.command()
@study_option
@storage_option
@study_name_option
@tracking_uri_option
@click.option("--top", type=POSITIVE, default=3, show_default=True, metavar="K",
              help="The best K complete configurations to confirm (the recipe and the baseline are added).")
@click.option("--seeds", type=POSITIVE, default=None, metavar="N",
              help="Fresh seeds per configuration (default 3, at least 2: a spread needs two runs); with --folds, "
                   "repeats of the cross-validation (default 1).")
@click.option("--folds", type=_Count(min=2), default=None, metavar="F",
              help="F-fold cross-validation on the pooled training and validation rows, for data whose validation "
                   "split is too small to choose with.")
@click.option("--ablate", is_flag=True,
              help="Then retrain the winner without each of its regularizers, and the baseline with each alone, "
                   "with the same seeds (or folds): what each regularizer is worth, paired.")
@set_option
@data_dir_option
@plugin_option
def confirm(study: str, storage: str | None, study_name: str | None, tracking_uri: str | None, top: int,
            seeds: int | None, folds: int | None, ablate: bool, overrides: list[tuple[str, str]],
            data_dir: str | None, plugins: tuple[str, ...]) -> None:
    """Retrain the top configurations, the recipe and the baseline with fresh seeds (or in k-fold
    cross-validation); choose on mean val_acc.

    The study is retrained as it stored itself (its file after --set, its plugins, its data): its name is enough.
    """
    import optuna

    from regsearch._confirm import confirm as run
    from regsearch.cli._display import print_confirmation

    _check_locations(storage, tracking_uri)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    from regsearch._spec import seeds_problem

    problem = seeds_problem(seeds, folds, folds_name="--folds")
    if problem:
        raise click.BadParameter(problem, param_hint="'--seeds'")
    run(study, top=top, seeds=seeds, folds=folds, storage=storage, study_name=study_name, tracking_uri=tracking_uri,
        overrides=overrides, data_dir=data_dir, plugins=plugins, ablate=ablate)
    from regsearch._opening import load_stored_study

    print_confirmation(load_stored_study(study, storage, study_name))


@cli.command()
@study_option
@storage_option
@tracking_uri_option
@study_name_option
def sync(study: str, storage: str | None, tracking_uri: str | None, study_name: str | None) -> None:
    """Log to MLflow the finished trials it lacks (the tracking store was down), from the Optuna storage."""
    import optuna

    from regsearch._sync_study import sync_study

    _check_locations(storage, tracking_uri)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    name, report = sync_study(study, storage=storage, tracking_uri=tracking_uri, study_name=study_name)
    click.echo(f"study {name}: {report.describe()}")


@cli.command()
@study_option
@storage_option
@study_name_option
@tracking_uri_option
@click.option("--out", type=click.Path(dir_okay=False), metavar="PATH",
              help="Where to write the report (default: STUDY-report.html, or .png, in the current folder).")
@click.option("--format", "fmt", type=click.Choice(["html", "png"]),
              help="html: one self-contained file with the figures embedded; png: one image. Default: from --out's "
                   "suffix, else html.")
def report(study: str, storage: str | None, study_name: str | None, tracking_uri: str | None, out: str | None,
           fmt: str | None) -> None:
    """Draw a stored study's report (history, importances, gap, curves, each regularizer's effect) into one file.

    Reads the Optuna storage only; the file is also logged on the study's MLflow parent run where there is one.
    """
    import optuna

    from regsearch import report as _report
    from regsearch._errors import ConfigError
    from regsearch._opening import load_stored_study
    from regsearch.tracking import default_tracking_uri, local_store_problem, log_to_parent_run

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    fmt = fmt or ("png" if out and out.lower().endswith(".png") else "html")
    opt_study = load_stored_study(study, storage, study_name)
    if not _report.finished(opt_study):
        raise ConfigError(f"study {opt_study.study_name!r} has no finished trials to report on")
    path = out or _report.file_name(opt_study.study_name, fmt)
    problem = local_store_problem(path)
    if problem:
        raise ConfigError(f"--out {path}: {problem}")
    written = _report.write(opt_study, path, fmt)
    click.echo(str(written))
    log_to_parent_run(opt_study, written, tracking_uri or default_tracking_uri())


_signal_received: int | None = None


def _interrupt(signum: int, frame: Any) -> None:
    # SIGTERM ends a study like Ctrl-C: the running trial is failed, its run KILLED; the exit code tells which
    global _signal_received
    _signal_received = signum
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    cli(prog_name="regsearch")


if __name__ == "__main__":
    main()
