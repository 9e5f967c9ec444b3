"""`regsearch report`: a stored study drawn into one self-contained HTML file (or one PNG), checked as a reader
sees it: every section there, every image decodable, nothing fetched from elsewhere, the file on the study's
MLflow parent run, and the page rendered by a real browser (headless Chromium) where one is installed.
"""

from __future__ import annotations

import base64
import io
import logging
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from regsearch.cli import cli
from tests.conftest import require

SECTIONS = ("summary", "history", "importance", "pareto", "curves", "effects")
"""The report's parts, by their HTML anchors."""
CHROMIUM = "/usr/bin/chromium"


@dataclass
class Stored:
    name: str
    storage: str
    url: str
    folder: Path


@pytest.fixture(scope="module")
def digits_study(mlflow_server, tmp_path_factory) -> Stored:
    """A real digits study (tiny: 8 trials of 3 epochs, some pruned) tracked on the session's MLflow server."""
    import regsearch

    folder = tmp_path_factory.mktemp("report")
    name = f"report_{uuid.uuid4().hex[:8]}"
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(folder)
            regsearch.optimize("digits", n_trials=8, storage=str(folder / "s.journal"), tracking_uri=mlflow_server,
                               study_name=name, device="cpu",
                               overrides=[("training.epochs", "3"), ("model.hidden", "[32]"),
                                          ("search.pruner.n_startup_trials", "2"),
                                          ("search.pruner.n_warmup_steps", "1")])
    finally:
        optuna.logging.set_verbosity(verbosity)
    return Stored(name, str(folder / "s.journal"), mlflow_server, folder)


def report(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["report", *args])
    return result.exit_code, result.stdout, result.stderr


def sections(page: str) -> dict[str, str]:
    """Each top-level section's HTML by its id (the header too)."""
    found = {m.group(1): m.group(2) for m in re.finditer(r'<section id="([\w-]+)">(.*?)\n</section>', page, re.DOTALL)}
    header = re.search(r'<header id="summary">(.*?)</header>', page, re.DOTALL)
    if header:
        found["summary"] = header.group(1)
    return found


def images(fragment: str) -> list:
    """The PNG images embedded in an HTML fragment, decoded (a broken one raises)."""
    from PIL import Image

    decoded = []
    for data in re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', fragment):
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
        decoded.append(image)
    return decoded


def parent_artifacts(stored: Stored) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=stored.url)
    experiment = client.get_experiment_by_name(stored.name)
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`regsearch.role` = 'study'")
    assert len(parents) == 1
    return [a.path for a in client.list_artifacts(parents[0].info.run_id)]


@pytest.fixture(scope="module")
def digits_html(digits_study, tmp_path_factory) -> Path:
    """`regsearch report` of the digits study, logged to its parent run on the server."""
    out = tmp_path_factory.mktemp("html") / "study.html"
    log = logging.getLogger("regsearch")
    saved = (log.handlers[:], log.level, log.propagate, optuna.logging.get_verbosity())
    try:  # what the `restore_logging` fixture does for one test, for the module
        code, stdout, stderr = report("--study", digits_study.name, "--storage", digits_study.storage,
                                      "--tracking-uri", digits_study.url, "--out", str(out))
    finally:
        log.handlers[:], log.level, log.propagate = saved[:3]
        optuna.logging.set_verbosity(saved[3])
    assert code == 0, stderr
    assert stdout.strip() == str(out)
    assert stderr == ""
    return out


@pytest.mark.slow  # a real digits study tracked on the session's MLflow server
def test_html_report_holds_every_section_with_images_and_nothing_external(digits_study, digits_html):
    page = digits_html.read_text(encoding="utf-8")
    parts = sections(page)
    assert set(SECTIONS) <= set(parts), sorted(parts)
    for key in ("history", "importance", "pareto", "curves"):
        pictures = images(parts[key])
        assert len(pictures) == 1 and pictures[0].width >= 800, (key, re.sub(r"base64,[^\"]+", "", parts[key]))
    # one figure per regularizer of the digits study, and one for the learning rate
    effects = re.findall(r'<section id="effect-([\w-]+)">', page)
    assert sorted(effects) == ["batchnorm", "dropout", "l1", "l2", "training"]
    assert len(images(parts["effects"])) == len(effects)
    study = optuna.load_study(study_name=digits_study.name, storage=optuna.storages.journal.JournalStorage(
        optuna.storages.journal.JournalFileBackend(digits_study.storage)))
    best = study.user_attrs["best_test"]
    assert f"best trial {best['trial']}:" in parts["summary"]
    assert f"test accuracy {best['test_acc']:.4f}" in parts["summary"]
    assert "Top trials" in parts["summary"]
    # self-contained: no script, stylesheet, font or image fetched from anywhere
    assert "<script" not in page and "<link" not in page
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "url(" not in page


@pytest.mark.slow
def test_study_run_and_report_command_put_the_report_on_the_parent_run(digits_study, digits_html):
    on_parent = parent_artifacts(digits_study)
    assert f"{digits_study.name}-report.html" in on_parent  # attached by the study itself when it ended
    assert digits_html.name in on_parent  # and by `regsearch report`


@pytest.mark.slow
def test_png_format_is_one_image_named_after_the_study(digits_study, tmp_path, monkeypatch, restore_logging):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = report("--study", digits_study.name, "--storage", digits_study.storage,
                                  "--tracking-uri", digits_study.url, "--format", "png")
    assert code == 0, stderr
    path = tmp_path / f"{digits_study.name}-report.png"
    assert stdout.strip() == path.name
    image = Image.open(path)
    image.load()
    assert image.width == 1200 and image.height > 3000  # header, four sections and five effect figures


@pytest.mark.slow
def test_a_store_without_the_study_run_is_one_warning_and_the_file_is_written(digits_study, tmp_path,
                                                                              mlflow_store, restore_logging):
    shutil.copy(mlflow_store, tmp_path / "mlflow.db")  # a real store that never saw this study
    out = tmp_path / "r.png"  # the suffix picks the format
    code, stdout, stderr = report("--study", digits_study.name, "--storage", digits_study.storage,
                                  "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--out", str(out))
    assert code == 0
    assert stdout.strip() == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "has no parent run in this store; the report is not logged to MLflow" in stderr


def _objective_like_regsearch(trial: optuna.Trial) -> tuple[float, float]:
    """Parameters and user attributes shaped as regsearch writes them, for a study built with Optuna directly."""
    lr = trial.suggest_float("lr", 1e-3, 1.0, log=True)
    bonus = 0.0
    if trial.suggest_categorical("l2.enabled", [True, False]):
        bonus += 0.02 * (1 + trial.suggest_float("l2.weight_decay", 1e-6, 1e-2, log=True))
    choice = trial.suggest_categorical("choice.noise", ["none", "mixup", "cutout"])
    if choice == "mixup":
        trial.suggest_float("mixup.alpha", 0.1, 1.0)
    if trial.number == 3:
        raise RuntimeError("diverged")
    val = 0.8 + bonus + 0.05 * (lr > 0.05) + 0.01 * (trial.number % 3)
    train = min(1.0, val + 0.1 - bonus)
    curve = [{"epoch": e, "train_acc": train * e / 3, "val_acc": val * e / 3} for e in (1, 2, 3)]
    trial.set_user_attr("metrics", {"train_acc": train, "val_acc": val, "gap_acc": train - val})
    trial.set_user_attr("curve", curve)
    if trial.number == 0:
        trial.set_user_attr("baseline", True)
        trial.set_user_attr("test_acc", 0.79)
    return val, train - val


def test_a_pareto_study_renders_every_section(tmp_path, restore_logging):
    storage = str(tmp_path / "p.journal")
    study = optuna.create_study(study_name="pareto", directions=["maximize", "minimize"],
                                storage=optuna.storages.journal.JournalStorage(
                                    optuna.storages.journal.JournalFileBackend(storage)),
                                sampler=optuna.samplers.RandomSampler(seed=1))
    study.optimize(_objective_like_regsearch, n_trials=14, catch=(RuntimeError,))
    out = tmp_path / "p.html"
    code, _, stderr = report("--study", "pareto", "--storage", storage, "--tracking-uri",
                             f"sqlite:///{tmp_path / 'none.db'}", "--out", str(out))
    assert code == 0, stderr
    # no tracking store there: one warning, and none is created where the user did not ask for one
    assert "no tracking store there; the report is not logged to MLflow" in stderr
    assert not (tmp_path / "none.db").exists()
    page = out.read_text(encoding="utf-8")
    parts = sections(page)
    assert set(SECTIONS) <= set(parts)
    for key in ("history", "importance", "pareto", "curves"):
        assert len(images(parts[key])) == 1, re.sub(r"base64,[^\"]+", "", parts[key])
    assert "Pareto front of val_acc and gap_acc" in parts["summary"]
    assert "baseline (no regularization) trial 0" in parts["summary"] and "test accuracy 0.7900" in parts["summary"]
    assert "13 complete, 1 fail" in parts["summary"]
    assert sorted(re.findall(r'<section id="effect-([\w-]+)">', page)) == ["choice-noise", "l2", "mixup",
                                                                           "training"]
    code, _, stderr = report("--study", "pareto", "--storage", storage, "--tracking-uri",
                             f"sqlite:///{tmp_path / 'none.db'}", "--format", "png", "--out", str(tmp_path / "p.png"))
    assert code == 0, stderr


def test_a_gap_limited_study_ranks_feasible_trials_first(tmp_path, restore_logging):
    storage = str(tmp_path / "g.journal")
    study = optuna.create_study(study_name="gap", direction="maximize", storage=optuna.storages.journal.JournalStorage(
        optuna.storages.journal.JournalFileBackend(storage)), sampler=optuna.samplers.RandomSampler(seed=1))
    study.set_user_attr("regsearch.max_gap", 0.05)

    def objective(trial: optuna.Trial) -> float:  # later trials validate better; the odd ones break the limit
        trial.suggest_float("lr", 1e-3, 1.0, log=True)
        val, gap = 0.8 + 0.01 * trial.number, 0.1 if trial.number % 2 else 0.02
        trial.set_user_attr("metrics", {"train_acc": val + gap, "val_acc": val, "gap_acc": gap})
        trial.set_constraint("gap_acc", gap - 0.05)
        return val

    study.optimize(objective, n_trials=8)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    gaps = {t.number: t.user_attrs["metrics"]["gap_acc"] for t in complete}
    feasible = [t for t in complete if gaps[t.number] <= 0.05]
    assert feasible and max(t.value for t in complete) > max(t.value for t in feasible), "the limit must matter"
    out = tmp_path / "g.html"
    code, _, stderr = report("--study", "gap", "--storage", storage, "--tracking-uri",
                             f"sqlite:///{tmp_path / 'none.db'}", "--out", str(out))
    assert code == 0, stderr
    summary = sections(out.read_text(encoding="utf-8"))["summary"]
    assert "objective: val_acc (maximize), subject to gap_acc &lt;= 0.05" in summary
    assert f"best trial {study.best_trial.number}:" in summary
    table = summary[summary.index("feasible"):]
    first = int(re.search(r"\n\s*(\d+)\s", table).group(1))  # the table's first row: the best feasible trial
    assert first == study.best_trial.number and gaps[first] <= 0.05


def test_importance_says_why_when_there_are_too_few_complete_trials(tmp_path, restore_logging):
    storage = str(tmp_path / "few.journal")
    study = optuna.create_study(study_name="few", direction="maximize", storage=optuna.storages.journal.JournalStorage(
        optuna.storages.journal.JournalFileBackend(storage)))
    study.optimize(lambda t: t.suggest_float("lr", 0.01, 0.1) if t.number == 0 else _prune(t), n_trials=2)
    out = tmp_path / "few.html"
    code, _, stderr = report("--study", "few", "--storage", storage, "--tracking-uri",
                             f"sqlite:///{tmp_path / 'none.db'}", "--out", str(out))
    assert code == 0, stderr
    parts = sections(out.read_text(encoding="utf-8"))
    assert "needs at least 2 complete trials; the study has 1" in parts["importance"]
    assert images(parts["importance"]) == []
    assert len(images(parts["history"])) == 1


def _prune(trial: optuna.Trial) -> float:
    trial.suggest_float("lr", 0.01, 0.1)
    trial.report(0.5, 1)
    raise optuna.TrialPruned()


@pytest.mark.slow
def test_chromium_renders_the_report_with_every_image_decoded(digits_html, tmp_path):
    require(Path(CHROMIUM).is_file(), f"headless Chromium is not installed at {CHROMIUM} (Debian package chromium)")
    out = digits_html
    # the report has no script; a copy gets one that counts, once the page has loaded, the images the browser decoded
    probe = tmp_path / "probe.html"
    count = ("<script>addEventListener('load', function () { var all = Array.from(document.images); "
             "document.body.dataset.decoded = all.filter(function (i) { return i.complete && i.naturalWidth > 0; })"
             ".length + '/' + all.length; });</script>")
    probe.write_text(out.read_text(encoding="utf-8").replace("</body>", count + "</body>"), encoding="utf-8")
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*browser, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    total = len(re.findall(r"<img ", out.read_text(encoding="utf-8")))
    assert f'data-decoded="{total}/{total}"' in dom, dom[:300]
    for key in SECTIONS:
        assert f'id="{key}"' in dom
    shot = tmp_path / "shot.png"
    subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1280,2400", out.as_uri()],
                   capture_output=True, timeout=60, check=True)
    from PIL import Image

    pixels = Image.open(shot).convert("L")
    dark = sum(pixels.histogram()[:128])  # text, axes, markers
    assert dark > 0.005 * pixels.width * pixels.height, "the page rendered (nearly) blank"


def test_the_confirmation_legend_survives_a_bottom_row_whose_runs_all_diverged(monkeypatch):
    """The baseline drawn at the bottom diverged in every run: the bars and diamonds of the rows above still get
    their legend entries, once each."""
    from regsearch._records import CONFIRM_ATTR
    from regsearch.report import _figures

    drawn = []
    monkeypatch.setattr(_figures, "png_bytes", lambda fig: drawn.append(fig) or b"png")
    study = optuna.create_study(study_name="legend")

    def row(trial, role, val, winner=False):
        known = [v for v in val if v is not None]
        return {"trial": trial, "role": role, "config": "augment + l2", "winner": winner, "val_acc": val,
                "val_acc_mean": sum(known) / len(known) if known else None, "val_acc_sd": 0.01 if known else None,
                "test_acc_mean": 0.7 if known else None, "diverged": val.count(None)}

    study.set_user_attr(CONFIRM_ATTR, {"rows": [row(1, "recipe", [0.73, 0.74], winner=True),
                                                row(4, "searched", [0.70, 0.71]),
                                                row(0, "baseline", [None, None])], "sentence": ""})
    section = _figures._confirmation(study)
    assert section.png == b"png"
    legend = drawn[0].axes[0].get_legend()
    assert sorted(t.get_text() for t in legend.get_texts()) == ["test_acc, mean", "val_acc, mean ± sd"]
