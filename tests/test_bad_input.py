"""Every bad input gets exit 2 and one line on stderr naming what is wrong and where; nothing stored is lost.

One table, one test: each case writes its own files (study YAML, plugin .py, tiny CIFAR-10 files) into its own
folder, runs `regsearch` there (in-process with click's CliRunner unless a real process matters) and checks
the answer. Cases marked `keep` start from a folder where a tiny real study ran (run once, copied per case) and
check afterwards that the bad command lost none of its trials or MLflow runs.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from regsearch import _registry
from regsearch.cli import cli
from regsearch.data.cifar import ARCHIVE, FOLDER, RECORD, TEST_FILE, TRAIN_FILES
from tests.conftest import without_dac

TINY_RUN = ("--set", "training.epochs=1", "--n-trials", "1")
"""Bounds a command that should fail but might not: wrongly accepted input trains one epoch, not a study."""

TINY_STUDY = """\
data: {name: digits}
model: {name: mlp, hidden: [16]}
training: {epochs: 1}
search: {n_trials: 1}
"""
"""A valid study file the study-file and plugin cases add to (one trial of one epoch if it ever runs)."""


# --------------------------------------------------------------------------------------------------------------
# what a case writes


def cifar_batch(n: int = 2, labels: tuple[int, ...] = (), seed: int = 0) -> bytes:
    """`n` CIFAR-10 binary records (label byte + 3072 pixel bytes); `labels` overrides the first labels."""
    pixels = random.Random(seed).randbytes  # noise: an archive of these files is as large as the files
    return b"".join(bytes([labels[i] if i < len(labels) else i % 10]) + pixels(RECORD - 1) for i in range(n))


def cifar_folder(**damaged: bytes) -> dict[str, bytes]:
    """The official extracted layout with tiny batch files; keyword arguments replace files by name."""
    files = {f"{FOLDER}/{name}": cifar_batch(seed=i) for i, name in enumerate((*TRAIN_FILES, TEST_FILE))}
    for name, raw in damaged.items():
        files[f"{FOLDER}/{name}.bin"] = raw
    return files


def tar_gz(files: dict[str, bytes]) -> bytes:
    """A .tar.gz holding `files` (name -> bytes)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, raw in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return buffer.getvalue()


def table(*rows: str, header: str = "x,colour,y") -> str:
    """A small CSV: `header`, then `rows`, then enough good rows (two classes) to be a table worth splitting."""
    good = [f"{i},{'red' if i % 3 else 'blue'},{'ab'[i % 2]}" for i in range(20)]
    return "\n".join([header, *rows, *good]) + "\n"


def state_dict_file(**shapes: tuple[int, ...]) -> bytes:
    """A .pth state dict of zero tensors of these shapes (a `_` in a name stands for the `.` a keyword cannot hold)."""
    import torch

    buffer = io.BytesIO()
    torch.save({name.replace("_", "."): torch.zeros(shape) for name, shape in shapes.items()}, buffer)
    return buffer.getvalue()


TINY_MLP = "optimize --study digits --set model.hidden=[16] "
"""The digits study's MLP as Sequential(Flatten, Linear 64->16, ReLU, Linear 16->10): tensors 1.* and 3.*."""

TABLE = "optimize --study tabular --set data.target=y --set data.path="
"""The shipped table study on a file of the case's folder (the path follows)."""


def plugin(name: str, *methods: str, header: str = "") -> str:
    """A plugin file registering one `Regularizer` subclass under `name` with the given methods."""
    body = "".join(textwrap.indent(textwrap.dedent(m), "    ") for m in methods)
    return (f"import torch\nimport regsearch\n{header}\n\n\n@regsearch.register({name!r})\n"
            f"class Plugin(regsearch.Regularizer):\n    '''A test plugin.'''\n\n{body}")


SPACE = "def search_space(self, trial):\n    return {'a': trial.suggest_float('a', 0.1, 1.0)}\n"


def uses(name: str) -> str:
    """A tiny study that switches on the regularizer `name` from the plugin file next to it."""
    return TINY_STUDY + f"regularizers: {{{name}: {{enabled: true}}}}\nplugins: [plugin.py]\n"


def png(shade: int = 0, size: int = 12) -> bytes:
    """A small real PNG file's bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (shade, 255 - shade, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


def photos(**files: bytes) -> dict[str, bytes]:
    """photos/<class>/<file>: two classes of six real PNGs each; keyword arguments add files (`dog__x_png`)."""
    tree = {f"photos/{c}/{i}.png": png(40 * i + k) for k, c in enumerate(("cat", "dog")) for i in range(6)}
    tree.update({"photos/" + name.replace("__", "/").replace("_png", ".png").replace("_txt", ".txt"): raw
                 for name, raw in files.items()})
    return tree


def empty_photos(tmp: Path) -> None:
    (tmp / "photos").mkdir()


def read_only_cache(tmp: Path) -> None:
    (tmp / "cache").mkdir()
    (tmp / "cache").chmod(0o555)


IMAGES = "optimize --study images --set data.image_size=8 --set training.steps=1 --set data.path="
"""The shipped images study on a folder or CSV of the case's folder (the path follows)."""


def symlink_loop(tmp: Path) -> None:
    (tmp / "loop.py").symlink_to(tmp / "loop.py")


def no_read_permission(tmp: Path) -> None:
    (tmp / "secret.py").write_text(plugin("unreadable", SPACE))
    (tmp / "secret.py").chmod(0)


def failed_study(tmp: Path) -> None:
    """A stored study whose only trial failed: nothing to report on."""
    storage = optuna.storages.journal.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp / "f.journal")))
    study = optuna.create_study(study_name="broken", storage=storage, direction="maximize")
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)


def read_only_folder(tmp: Path) -> None:
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)


# --------------------------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    """The command line after `regsearch`; `{tmp}` is the case's folder."""
    message: str
    """A fragment of the one `Error:` line that names what is wrong and where."""
    files: dict[str, str | bytes] = field(default_factory=dict)
    """Files written into the case's folder before the command (text may use `{tmp}`)."""
    setup: Callable[[Path], None] | None = None
    """Anything files cannot say (a symlink, a permission), done to the case's folder."""
    keep: bool = False
    """Run a tiny real study in the folder first; the bad command must lose none of it."""
    secret: str | None = None
    """A password given on the command line that must appear nowhere in the output."""
    absent: str | None = None
    """A file the command must not have created (a YAML tag that tried to run a command)."""
    process: bool = False
    """Run the real `regsearch` executable without the capability to read files regardless of permissions."""


def case(case_id: str, args: str | list[str], message: str, *, bounded: bool = True, **kwargs) -> pytest.param:
    """A row of the table; `optimize` gets TINY_RUN first (an option repeated by the case wins) if `bounded`."""
    args = tuple(args.split()) if isinstance(args, str) else tuple(args)
    if bounded and args[0] == "optimize":
        args = (args[0], *TINY_RUN, *args[1:])
    return pytest.param(Case(args, message, **kwargs), id=case_id)


CASES = [
    # --- the command line ------------------------------------------------------------------------------------
    case("cli-unknown-study-suggests-closest", "optimize --study digts",
         "unknown study 'digts' (did you mean 'digits'?); known: cifar, cocktail, cocktail-tabular, digits, images, "
         "tabular"),
    case("cli-missing-study-file", "optimize --study {tmp}/nope.yaml", "study file {tmp}/nope.yaml does not exist"),
    case("cli-n-trials-zero", "optimize --study digits --n-trials 0",
         "Invalid value for '--n-trials': 0 is not in the range x>=1."),
    case("cli-n-trials-negative", "optimize --study digits --n-trials -3",
         "Invalid value for '--n-trials': -3 is not in the range x>=1."),
    case("cli-n-trials-not-integer", "optimize --study digits --n-trials 2.5",
         "Invalid value for '--n-trials': '2.5' is not a valid integer"),
    case("cli-n-trials-not-a-number", "optimize --study digits --n-trials many",
         "Invalid value for '--n-trials': 'many' is not a valid integer"),
    case("cli-timeout-zero", "optimize --study digits --timeout 0",
         "Invalid value for '--timeout': 0.0 is not in the range x>0."),
    case("cli-timeout-negative", "optimize --study digits --timeout -5",
         "Invalid value for '--timeout': -5.0 is not in the range x>0."),
    case("cli-timeout-not-a-number", "optimize --study digits --timeout soon",
         "Invalid value for '--timeout': 'soon' is not a valid float"),
    case("cli-timeout-nan", "optimize --study digits --timeout nan",
         "Invalid value for '--timeout': nan is not in the range x>0"),
    case("cli-timeout-inf", "optimize --study digits --timeout inf",
         "Invalid value for '--timeout': must be finite; got inf (leave it out for no limit)"),
    case("cli-set-without-equals", "optimize --study digits --set training.epochs",
         "Invalid value for '--set': expected KEY=VALUE (e.g. training.epochs=5); got 'training.epochs'"),
    case("cli-set-empty-key", "optimize --study digits --set =5",
         "Invalid value for '--set': expected KEY=VALUE"),
    case("cli-set-empty-key-part", "optimize --study digits --set training..epochs=5",
         "--set training..epochs=5: the key must be dotted names like training.epochs"),
    case("cli-set-unknown-key-keeps-study", "optimize --study digits --set training.epoch=3",
         "training.epoch: unknown key (did you mean 'epochs'?)", keep=True),
    case("cli-set-wrong-type", "optimize --study digits --set training.epochs=three",
         "--set training.epochs=three: training.epochs: expected a whole number; got 'three'"),
    case("cli-set-into-a-list", "optimize --study digits --set training.lr.low=0.1",
         "--set training.lr.low: training.lr is not a mapping"),
    case("cli-set-value-not-yaml", "optimize --study digits --set training.lr=[0.1",
         "--set training.lr=[0.1: the value is not a YAML scalar"),
    case("cli-set-yaml-tag", ["optimize", "--study", "digits", "--set",
                              "seed=!!python/object/apply:os.system ['touch {tmp}/owned']"],
         "the value is not a YAML scalar", absent="owned"),
    case("cli-device-cuda-without-cuda", "optimize --study digits --device cuda",
         "--device cuda: no CUDA device is available here", keep=True),
    case("cli-device-mps-without-mps", "optimize --study digits --device mps",
         "--device mps: no MPS device is available here"),
    case("cli-device-unknown", "optimize --study digits --device tpu",
         "Invalid value for '--device': 'tpu' is not one of 'auto', 'cpu', 'cuda', 'mps'"),
    case("cli-plugin-missing", "optimize --study digits --plugin {tmp}/nowhere.py",
         "plugin file {tmp}/nowhere.py does not exist"),
    case("cli-plugin-is-a-folder", "optimize --study digits --plugin {tmp}",
         "Invalid value for '--plugin': File '{tmp}' is a directory"),
    case("cli-plugin-not-a-py-file", "optimize --study digits --plugin {tmp}/plugin.txt",
         "plugin file {tmp}/plugin.txt cannot be imported (is it a .py file?)",
         files={"plugin.txt": plugin("txt_plugin", SPACE)}),
    case("cli-plugin-symlink-loop", "optimize --study digits --plugin {tmp}/loop.py",
         "plugin file {tmp}/loop.py cannot be read", setup=symlink_loop),
    case("cli-plugin-without-read-permission", "optimize --study digits --plugin {tmp}/secret.py",
         "Invalid value for '--plugin': File '{tmp}/secret.py' is not readable", setup=no_read_permission,
         process=True),
    case("cli-storage-unknown-scheme", "optimize --study digits --storage redis://127.0.0.1/0",
         "--storage redis://127.0.0.1/0: unknown scheme 'redis'"),
    case("cli-storage-unknown-scheme-masks-password",
         "optimize --study digits --storage redis://bob:hunter2@127.0.0.1/0",
         "--storage redis://bob:***@127.0.0.1/0: unknown scheme 'redis'", secret="hunter2"),
    case("cli-storage-unreachable-host-masks-password",
         "optimize --study digits --storage postgresql://alice:s3cret@127.0.0.1:1/db",
         "--storage postgresql://alice:***@127.0.0.1:1/db: cannot open the database", secret="s3cret", keep=True),
    case("cli-storage-sqlite-missing-folder", "optimize --study digits --storage sqlite:///{tmp}/no/such/dir/x.db",
         "--storage sqlite:///{tmp}/no/such/dir/x.db: cannot open the database"),
    case("cli-storage-journal-missing-folder", "optimize --study digits --storage {tmp}/no/x.journal",
         "--storage {tmp}/no/x.journal: folder {tmp}/no does not exist"),
    case("cli-storage-is-a-folder", "optimize --study digits --storage {tmp}",
         "--storage {tmp}: is a folder"),
    case("cli-tracking-uri-unknown-scheme-keeps-study", "optimize --study digits --tracking-uri nosuch://tracker",
         "--tracking-uri nosuch://tracker: cannot use the MLflow tracking store", keep=True),
    case("cli-show-unknown-stored-study", "show --study digts --storage {tmp}/empty.journal",
         "unknown study in {tmp}/empty.journal: 'digts'", files={"empty.journal": ""}),
    case("cli-max-gap-negative", "optimize --study digits --max-gap -0.1", "--max-gap: must be >= 0.0; got -0.1"),
    case("cli-max-gap-above-1", "optimize --study digits --max-gap 1.5", "--max-gap: must be <= 1.0; got 1.5"),
    case("cli-max-gap-nan", "optimize --study digits --max-gap nan", "--max-gap: expected a number; got nan"),
    case("cli-max-gap-not-a-number", "optimize --study digits --max-gap small",
         "Invalid value for '--max-gap': 'small' is not a valid float"),
    case("cli-objective-unknown", "optimize --study digits --objective paretto",
         "--objective: unknown value 'paretto' (did you mean 'pareto'?); known: pareto, val_acc"),
    case("cli-max-gap-with-pareto", "optimize --study digits --objective pareto --max-gap 0.05",
         "max_gap 0.05 and objective pareto do not combine"),
    case("cli-pareto-on-a-val-acc-study-keeps-study", "optimize --study digits --objective pareto",
         "study 'digits' in regsearch.journal was made with objective val_acc; it cannot go on with objective pareto",
         keep=True),
    case("cli-max-gap-on-an-unconstrained-study-keeps-study", "optimize --study digits --max-gap 0.05",
         "was made with no --max-gap; it cannot go on with --max-gap 0.05", keep=True),
    case("cli-report-unknown-stored-study", "report --study digts --storage {tmp}/empty.journal",
         "unknown study in {tmp}/empty.journal: 'digts'", files={"empty.journal": ""}),
    case("cli-report-study-without-finished-trials", "report --study broken --storage {tmp}/f.journal",
         "study 'broken' has no finished trials to report on", setup=failed_study, absent="broken-report.html"),
    case("cli-report-out-missing-folder-keeps-study", "report --study digits --out {tmp}/no/r.html",
         "--out {tmp}/no/r.html: folder {tmp}/no does not exist", keep=True),
    case("cli-report-out-read-only-folder", "report --study digits --out {tmp}/ro/r.html",
         "--out {tmp}/ro/r.html: cannot write to folder {tmp}/ro", setup=read_only_folder, keep=True, process=True),
    case("cli-report-out-is-a-folder", "report --study digits --out {tmp}",
         "Invalid value for '--out': File '{tmp}' is a directory",
         keep=True),
    case("cli-report-unknown-format", "report --study digits --format pdf",
         "Invalid value for '--format': 'pdf' is not one of 'html', 'png'"),
    case("cli-cocktail-without-the-extras-package", "optimize --study cocktail-tabular",
         "'label_smoothing' comes with the regsearch-extras package: pip install ./plugins/regsearch-extras"),

    # --- study files -----------------------------------------------------------------------------------------
    case("study-not-yaml", "optimize --study {tmp}/s.yaml", "s.yaml: not valid YAML at line",
         files={"s.yaml": "training: {epochs: [1, 2\n"}),
    case("study-tab-indented", "optimize --study {tmp}/s.yaml", "s.yaml: not valid YAML at line 2",
         files={"s.yaml": "training:\n\tepochs: 1\n"}),
    case("study-not-utf8", "optimize --study {tmp}/s.yaml", "cannot read study file {tmp}/s.yaml",
         files={"s.yaml": b"description: caf\xe9\n"}),
    case("study-empty", "optimize --study {tmp}/s.yaml", "s.yaml: the study file is empty", files={"s.yaml": ""},
         bounded=False),
    case("study-only-comments", "optimize --study {tmp}/s.yaml", "s.yaml: the study file is empty",
         files={"s.yaml": "# nothing yet\n"}, bounded=False),
    case("study-a-list", "optimize --study {tmp}/s.yaml", "s.yaml: a study file is a mapping of keys; got a list",
         files={"s.yaml": "- training\n- search\n"}, bounded=False),
    case("study-a-scalar", "optimize --study {tmp}/s.yaml", "s.yaml: a study file is a mapping of keys; got a str",
         files={"s.yaml": "just some words\n"}, bounded=False),
    case("study-a-list-with-set", "optimize --study {tmp}/s.yaml",
         "s.yaml: a study file is a mapping of keys; got a list", files={"s.yaml": "- training\n"}),
    case("study-empty-with-set", "optimize --study {tmp}/s.yaml", "s.yaml: the study file is empty",
         files={"s.yaml": ""}),
    case("study-unknown-top-level-key", "optimize --study {tmp}/s.yaml",
         "s.yaml: trainig: unknown key (did you mean 'training'?)", files={"s.yaml": "trainig: {epochs: 1}\n"}),
    case("study-unknown-nested-key", "optimize --study {tmp}/s.yaml",
         "s.yaml: training.epochz: unknown key (did you mean 'epochs'?)",
         files={"s.yaml": "training: {epochz: 1}\n"}),
    case("study-duplicate-key", "optimize --study {tmp}/s.yaml",
         "s.yaml: not valid YAML at line 5, column 1: duplicate key 'training'",
         files={"s.yaml": TINY_STUDY + "training: {epochs: 2}\n"}),
    case("study-unknown-regularizer", "optimize --study {tmp}/s.yaml",
         "unknown regularizer 'dropuot' (did you mean 'dropout'?)",
         files={"s.yaml": TINY_STUDY + "regularizers: {dropuot: {}}\n"}),
    case("study-unknown-regularizer-option", "optimize --study {tmp}/s.yaml",
         "regularizers.l1.strenght: unknown option (did you mean 'strength'?)",
         files={"s.yaml": TINY_STUDY + "regularizers: {l1: {strenght: 1.0e-4}}\n"}),
    case("study-range-low-above-high", "optimize --study {tmp}/s.yaml",
         "s.yaml: training.lr: low must not exceed high; got [0.3, 0.01]",
         files={"s.yaml": "training: {lr: [0.3, 0.01]}\n"}),
    case("study-plugin-range-low-above-high", "optimize --study {tmp}/s.yaml",
         "regularizers.l1.strength: low must not exceed high; got [0.001, 1e-06]",
         files={"s.yaml": TINY_STUDY + "regularizers: {l1: {strength: [1.0e-3, 1.0e-6]}}\n"}),
    case("study-log-range-with-zero", "optimize --study {tmp}/s.yaml",
         "s.yaml: training.lr: a log-scale range must be above 0; got [0, 0.1]",
         files={"s.yaml": "training: {lr: [0, 0.1]}\n"}),
    case("study-plugin-log-range-with-zero", "optimize --study {tmp}/s.yaml",
         "regularizers.l2.weight_decay: a log-scale range must be above 0; got [0, 0.01]",
         files={"s.yaml": TINY_STUDY + "regularizers: {l2: {weight_decay: [0, 0.01]}}\n"}),
    case("study-dropout-p-above-1", "optimize --study {tmp}/s.yaml",
         "regularizers.dropout.p: must be in [0.0, 1.0); got [0.2, 1.5]",
         files={"s.yaml": TINY_STUDY + "regularizers: {dropout: {p: [0.2, 1.5]}}\n"}),
    case("study-dropout-p-exactly-1", "optimize --study {tmp}/s.yaml",
         "regularizers.dropout.p: must be in [0.0, 1.0); got 1.0",
         files={"s.yaml": TINY_STUDY + "regularizers: {dropout: {p: 1.0}}\n"}),
    case("study-dropout-p-negative", "optimize --study {tmp}/s.yaml",
         "regularizers.dropout.p: must be >= 0.0; got [-0.1, 0.5]",
         files={"s.yaml": TINY_STUDY + "regularizers: {dropout: {p: [-0.1, 0.5]}}\n"}),
    case("study-val-fraction-above-range", "optimize --study {tmp}/s.yaml",
         "s.yaml: data.val_fraction: must be <= 0.9; got 1.5", files={"s.yaml": "data: {val_fraction: 1.5}\n"}),
    case("study-unknown-model", "optimize --study {tmp}/s.yaml",
         "model.name: unknown model 'mpl' (did you mean 'mlp'?); known: cnn, mlp, resnet, resnet18, resnet34, "
         "resnet50; or an import path 'package.module:callable'",
         files={"s.yaml": TINY_STUDY.replace("name: mlp", "name: mpl")}),
    case("study-unknown-model-option", "optimize --study {tmp}/s.yaml",
         "model.hiden: unknown option (did you mean 'hidden'?)",
         files={"s.yaml": TINY_STUDY.replace("hidden:", "hiden:")}),
    case("study-unknown-dataset", "optimize --study {tmp}/s.yaml",
         "s.yaml: data.name: unknown value 'mnist'; known: cifar10, digits, images, table",
         files={"s.yaml": "data: {name: mnist}\n"}),
    case("study-unknown-optimizer", "optimize --study {tmp}/s.yaml",
         "s.yaml: training.optimizer: unknown value 'adamm' (did you mean 'adamw'?)",
         files={"s.yaml": "training: {optimizer: adamm}\n"}),
    case("study-unknown-precision", "optimize --study digits --set training.precision=bf16",
         "--set training.precision=bf16: training.precision: unknown value 'bf16' (did you mean 'bfloat16'?)"),
    case("study-unknown-sampler", "optimize --study {tmp}/s.yaml",
         "s.yaml: search.sampler.name: unknown value 'cmaes'; known: random, tpe",
         files={"s.yaml": "search: {sampler: {name: cmaes}}\n"}),
    case("study-unknown-pruner", "optimize --study {tmp}/s.yaml",
         "s.yaml: search.pruner.name: unknown value 'medain' (did you mean 'median'?)",
         files={"s.yaml": "search: {pruner: {name: medain}}\n"}),
    case("study-max-gap-above-1", "optimize --study digits --set search.max_gap=2",
         "--set search.max_gap=2: search.max_gap: must be <= 1.0; got 2.0"),
    case("study-unknown-objective", "optimize --study {tmp}/s.yaml",
         "s.yaml: search.objective: unknown value 'gap_acc' (did you mean 'val_acc'?); known: pareto, val_acc",
         files={"s.yaml": "search: {objective: gap_acc}\n"}),
    case("study-max-gap-with-pareto", "optimize --study {tmp}/s.yaml",
         "s.yaml: max_gap 0.1 and objective pareto do not combine",
         files={"s.yaml": "search: {objective: pareto, max_gap: 0.1}\n"}),
    case("study-dropout-site-matches-nothing", "optimize --study {tmp}/s.yaml",
         "regularizers.dropout: no dropout site matches encoder.* in this model",
         files={"s.yaml": TINY_STUDY + "regularizers: {dropout: {types: [], sites: ['encoder.*']}}\n"}),
    case("study-batchnorm-site-matches-nothing", "optimize --study {tmp}/s.yaml",
         "regularizers.batchnorm: no batchnorm site matches conv* in this model",
         files={"s.yaml": TINY_STUDY + "regularizers: {batchnorm: {types: [], sites: ['conv*']}}\n"}),
    case("study-yaml-tag-builds-no-object", "optimize --study {tmp}/s.yaml", "s.yaml: not valid YAML at line 1",
         files={"s.yaml": "seed: !!python/object/apply:os.system ['touch {tmp}/owned']\n"}, absent="owned"),
    case("study-plugin-listed-without-read-permission", "optimize --study {tmp}/s.yaml",
         "plugin file {tmp}/secret.py is not readable", files={"s.yaml": TINY_STUDY + "plugins: [secret.py]\n"},
         setup=no_read_permission, process=True),
    case("study-plugin-listed-symlink-loop", "optimize --study {tmp}/s.yaml",
         "plugin file {tmp}/loop.py cannot be read", files={"s.yaml": TINY_STUDY + "plugins: [loop.py]\n"},
         setup=symlink_loop),
    case("study-plugin-listed-but-missing", "optimize --study {tmp}/s.yaml",
         "plugin file {tmp}/plugs/missing.py does not exist",
         files={"s.yaml": TINY_STUDY + "plugins: [plugs/missing.py]\n"}),

    # --- plugins ---------------------------------------------------------------------------------------------
    case("plugin-syntax-error-keeps-study", "optimize --study digits --plugin {tmp}/plugin.py",
         "plugin file {tmp}/plugin.py: syntax error at line 2", files={"plugin.py": "import regsearch\ndef (:\n"},
         keep=True),
    case("plugin-import-error", "optimize --study digits --plugin {tmp}/plugin.py",
         "plugin file {tmp}/plugin.py: cannot be imported: ModuleNotFoundError: No module named 'no_such_module_x'",
         files={"plugin.py": plugin("import_error", SPACE, header="import no_such_module_x")}),
    case("plugin-raises-at-import", "optimize --study digits --plugin {tmp}/plugin.py",
         "plugin file {tmp}/plugin.py: cannot be imported: RuntimeError: no licence key",
         files={"plugin.py": "raise RuntimeError('no licence key')\n"}),
    case("plugin-from-study-file-syntax-error", "optimize --study {tmp}/s.yaml",
         "plugin file {tmp}/plugin.py: syntax error at line 1",
         files={"s.yaml": TINY_STUDY + "plugins: [plugin.py]\n", "plugin.py": "def broken(:\n"}),
    case("plugin-class-not-a-regularizer", "optimize --study digits --plugin {tmp}/plugin.py",
         "regularizer 'plain_class' (file {tmp}/plugin.py): <class",
         files={"plugin.py": "import regsearch\n\n@regsearch.register('plain_class')\nclass Plain:\n"
                             "    def search_space(self, trial):\n        return {}\n"}),
    case("plugin-no-search-space", "optimize --study digits --plugin {tmp}/plugin.py",
         "regularizer 'no_space' (file {tmp}/plugin.py): Plugin does not define search_space(self, trial)",
         files={"plugin.py": plugin("no_space", "def penalty(self, model, params):\n    return None\n")}),
    case("plugin-hook-wrong-signature", "optimize --study digits --plugin {tmp}/plugin.py",
         "regularizer 'bad_hook' (file {tmp}/plugin.py): Plugin.on_epoch_end(self, state) does not take "
         "(self, state, params)",
         files={"plugin.py": plugin("bad_hook", SPACE, "def on_epoch_end(self, state):\n    pass\n")}),
    case("plugin-penalty-wrong-signature", "optimize --study digits --plugin {tmp}/plugin.py",
         "regularizer 'bad_penalty' (file {tmp}/plugin.py): Plugin.penalty(self, params) does not take",
         files={"plugin.py": plugin("bad_penalty", SPACE, "def penalty(self, params):\n    return None\n")}),
    case("plugin-bad-name", "optimize --study digits --plugin {tmp}/plugin.py",
         "regularizer 'My-Reg' (file {tmp}/plugin.py): a name is lower-case letters",
         files={"plugin.py": plugin("My-Reg", SPACE)}),
    case("plugin-registers-nothing", "optimize --study digits --plugin {tmp}/plugin.py",
         "plugin file {tmp}/plugin.py registers no regularizer", files={"plugin.py": "x = 1\n"}),
    case("plugin-duplicate-of-builtin", "optimize --study digits --plugin {tmp}/plugin.py",
         "regularizer 'l2' is registered twice: by built-in and by file {tmp}/plugin.py",
         files={"plugin.py": plugin("l2", SPACE)}),
    case("plugin-duplicate-across-files", "optimize --study digits --plugin {tmp}/a.py --plugin {tmp}/b.py",
         "regularizer 'twin' is registered twice: by file {tmp}/a.py and by file {tmp}/b.py",
         files={"a.py": plugin("twin", SPACE), "b.py": plugin("twin", SPACE)}),
    case("plugin-same-parameter-two-ranges", "optimize --study {tmp}/s.yaml",
         "regularizer 'twice' (file {tmp}/plugin.py): search_space failed: PluginError: parameter 'twice.a' is "
         "suggested twice with different ranges",
         files={"s.yaml": uses("twice"), "plugin.py": plugin("twice", """\
             def search_space(self, trial):
                 return {'a': trial.suggest_float('a', 0.1, 1.0), 'b': trial.suggest_float('a', 0.1, 2.0)}
             """)}),
    case("plugin-search-space-not-a-dict", "optimize --study {tmp}/s.yaml",
         "regularizer 'listy' (file {tmp}/plugin.py): search_space failed: PluginError: search_space returned "
         "list, not a dict",
         files={"s.yaml": uses("listy"), "plugin.py": plugin("listy", """\
             def search_space(self, trial):
                 return [trial.suggest_float('a', 0.1, 1.0)]
             """)}),
    case("plugin-transform-returns-none", "optimize --study {tmp}/s.yaml",
         "regularizer 'forgetful' (file {tmp}/plugin.py): transform_model failed: PluginError: transform_model "
         "returned NoneType, not an nn.Module",
         files={"s.yaml": uses("forgetful"), "plugin.py": plugin("forgetful", SPACE, """\
             def transform_model(self, model, params):
                 model.add_module('extra', torch.nn.Identity())
             """)}),
    case("plugin-penalty-not-scalar", "optimize --study {tmp}/s.yaml",
         "regularizer 'vector_penalty' (file {tmp}/plugin.py): penalty must return a scalar tensor or None; got (3,)",
         files={"s.yaml": uses("vector_penalty"), "plugin.py": plugin("vector_penalty", SPACE, """\
             def penalty(self, model, params):
                 return torch.ones(3)
             """)}),
    case("plugin-penalty-a-float", "optimize --study {tmp}/s.yaml",
         "regularizer 'float_penalty' (file {tmp}/plugin.py): penalty must return a scalar tensor or None; got float",
         files={"s.yaml": uses("float_penalty"), "plugin.py": plugin("float_penalty", SPACE, """\
             def penalty(self, model, params):
                 return 0.5
             """)}),
    case("plugin-penalty-on-another-device", "optimize --study {tmp}/s.yaml",
         "regularizer 'meta_penalty' (file {tmp}/plugin.py): penalty returned a tensor on meta, the model trains "
         "on cpu",
         files={"s.yaml": uses("meta_penalty"), "plugin.py": plugin("meta_penalty", SPACE, """\
             def penalty(self, model, params):
                 return torch.zeros((), device='meta')
             """)}),
    case("plugin-batch-moved-to-another-device", "optimize --study {tmp}/s.yaml",
         "regularizer 'mover' (file {tmp}/plugin.py): transform_batch failed: PluginError: transform_batch turned "
         "inputs (64, 64) torch.float32 on cpu into (64, 64) torch.float32 on meta",
         files={"s.yaml": uses("mover"), "plugin.py": plugin("mover", SPACE, """\
             def transform_batch(self, x, y, params):
                 return x.to('meta'), y
             """)}),
    case("plugin-penalty-raises", "optimize --study {tmp}/s.yaml",
         "regularizer 'raising_penalty' (file {tmp}/plugin.py): penalty failed: KeyError: 'strength'",
         files={"s.yaml": uses("raising_penalty"), "plugin.py": plugin("raising_penalty", SPACE, """\
             def penalty(self, model, params):
                 return params['strength'] * sum(p.abs().sum() for p in model.parameters())
             """)}),
    case("plugin-unknown-option", "optimize --study {tmp}/s.yaml",
         "regularizers.opt_plugin.strenght: unknown option (did you mean 'strength'?); opt_plugin takes: strength",
         files={"s.yaml": TINY_STUDY + "regularizers: {opt_plugin: {strenght: 2}}\nplugins: [plugin.py]\n",
                "plugin.py": plugin("opt_plugin", "def __init__(self, strength=1.0):\n    self.strength = strength\n",
                                    SPACE)}),
    case("plugins-listing-syntax-error", "plugins --plugin {tmp}/plugin.py",
         "plugin file {tmp}/plugin.py: syntax error at line 1", files={"plugin.py": "def broken(:\n"}),

    # --- data ------------------------------------------------------------------------------------------------
    # --- a table --------------------------------------------------------------------------------------------
    case("table-missing-file", TABLE + "{tmp}/nope.csv", "no table at {tmp}/nope.csv"),
    case("table-set-path-is-relative-to-the-current-folder", TABLE + "nope.csv", "no table at {tmp}/nope.csv"),
    case("table-study-file-path-is-relative-to-the-file", "optimize --study {tmp}/sub/s.yaml",
         "no table at {tmp}/sub/nope.csv", files={"sub/s.yaml": "data: {name: table, path: nope.csv, target: y}\n"}),
    case("table-path-is-a-folder", TABLE + "{tmp}", "{tmp} is not a file"),
    case("table-without-path", "optimize --study tabular --set data.target=y",
         "tabular.yaml: data.path: data.name table needs the table's file and its label column: give them in the "
         "study file, or with --set data.path=FILE --set data.target=COLUMN"),
    case("table-without-target", "optimize --study tabular --set data.path={tmp}/t.csv",
         "tabular.yaml: data.target: data.name table needs the table's file and its label column",
         files={"t.csv": table()}),
    case("table-path-with-digits", "optimize --study digits --set data.path=t.csv",
         "--set data.path=t.csv: data.path: only a table has path (data.name is digits); set data.name=table"),
    case("table-group-repeats-with-digits", "optimize --study digits --set data.group_repeats=true",
         "data.group_repeats: only a table has group_repeats (data.name is digits)"),
    case("table-group-repeats-not-a-switch", TABLE + "t.csv --set data.group_repeats=often",
         "data.group_repeats: expected true or false; got 'often'", files={"t.csv": table()}),
    case("reshuffle-with-group-repeats", TABLE + "t.csv --set data.group_repeats=true --set search.reshuffle=true",
         "search.reshuffle and data.group_repeats do not combine", files={"t.csv": table()}),
    case("table-target-with-digits-in-a-study-file", "optimize --study {tmp}/s.yaml",
         "s.yaml: data.target: only a table has target (data.name is digits)",
         files={"s.yaml": TINY_STUDY.replace("{name: digits}", "{name: digits, target: y}")}),
    case("table-unknown-data-key", TABLE + "t.csv --set data.taget=y",
         "--set data.taget=y: data.taget: unknown key (did you mean 'target'?)", files={"t.csv": table()}),
    case("table-path-not-a-string", TABLE + "[a.csv,b.csv]", "data.path: expected a string"),
    case("table-unknown-target", "optimize --study tabular --set data.path=t.csv --set data.target=colur",
         "{tmp}/t.csv: unknown target column 'colur' (did you mean 'colour'?); known: colour, x, y",
         files={"t.csv": table()}),
    case("table-target-with-one-class", TABLE + "t.csv",
         "{tmp}/t.csv: the target 'y' has one class ('a'); nothing to learn",
         files={"t.csv": "x,y\n" + "".join(f"{i},a\n" for i in range(20))}),
    case("table-header-only", TABLE + "t.csv", "{tmp}/t.csv has no data rows", files={"t.csv": "x,colour,y\n"}),
    case("table-empty-file", TABLE + "t.csv", "{tmp}/t.csv is empty (not even a header row)", files={"t.csv": ""}),
    case("table-column-all-empty", TABLE + "t.csv", "{tmp}/t.csv: column 'z' is empty (every value is missing)",
         files={"t.csv": "x,z,y\n" + "".join(f"{i},,{'ab'[i % 2]}\n" for i in range(20))}),
    case("table-text-in-a-numeric-column", TABLE + "t.csv",
         "{tmp}/t.csv: column 'x', line 3 (the header is line 1): 'twelve' is not a number",
         files={"t.csv": table("1,red,a", "twelve,blue,b")}),
    case("table-missing-label", TABLE + "t.csv", "{tmp}/t.csv: the target 'y' is missing at line 3",
         files={"t.csv": table("1,red,a", "2,blue,")}),
    case("table-row-longer-than-the-header", TABLE + "t.csv", "{tmp}/t.csv: a row has more fields than the header",
         files={"t.csv": table("1,red,a,extra")}),
    case("table-unknown-feature", TABLE + "t.csv --set data.features=[x,colr]",
         "{tmp}/t.csv: unknown column in features 'colr' (did you mean 'colour'?)", files={"t.csv": table()}),
    case("table-target-listed-as-feature", TABLE + "t.csv --set data.features=[x,y]",
         "{tmp}/t.csv: the target 'y' is listed in features; it cannot be an input", files={"t.csv": table()}),
    case("table-no-features-left", TABLE + "t.csv --set data.features=[]",
         "{tmp}/t.csv: no input columns are left besides the target 'y'", files={"t.csv": table()}),
    case("table-unknown-categorical", TABLE + "t.csv --set data.categorical=[color]",
         "{tmp}/t.csv: unknown column in categorical 'color' (did you mean 'colour'?)", files={"t.csv": table()}),
    case("table-test-file-lacks-a-column", TABLE + "t.csv --set data.test_path=test.csv",
         "{tmp}/test.csv has no column 'colour' (the training table {tmp}/t.csv has)",
         files={"t.csv": table(), "test.csv": "x,y\n1,a\n2,b\n"}),
    case("table-test-file-with-a-new-class", TABLE + "t.csv --set data.test_path=test.csv",
         "{tmp}/test.csv: the target 'y' at line 3 (the header is line 1) is 'c', a class the training table does "
         "not have (classes: a, b)", files={"t.csv": table(), "test.csv": "x,colour,y\n1,red,a\n2,red,c\n"}),
    case("table-parquet-not-parquet", TABLE + "t.parquet", "{tmp}/t.parquet is not a readable Parquet file",
         files={"t.parquet": "x,colour,y\n1,red,a\n"}),
    case("data-missing-folder", "optimize --study cifar --data-dir {tmp}/nowhere",
         "CIFAR-10 data folder {tmp}/nowhere does not exist"),
    case("data-folder-without-cifar", "optimize --study cifar --data-dir {tmp}/empty",
         "no CIFAR-10 data in {tmp}/empty: expected cifar-10-binary.tar.gz", files={"empty/readme.txt": "hi\n"}),
    case("data-no-download-offline", "optimize --study cifar",
         "CIFAR-10 is not in {tmp}/cache/cifar10 and downloads are off"),
    case("data-archive-wrong-checksum", f"optimize --study cifar --data-dir {{tmp}}/{ARCHIVE}",
         f"{{tmp}}/{ARCHIVE}: checksum mismatch", files={ARCHIVE: tar_gz(cifar_folder())}),
    case("data-folder-with-archive-wrong-checksum", "optimize --study cifar --data-dir {tmp}",
         f"{{tmp}}/{ARCHIVE}: checksum mismatch", files={ARCHIVE: b"not the archive"}),
    case("data-archive-truncated", "optimize --study cifar --data-dir {tmp}/sample.tar.gz",
         "{tmp}/sample.tar.gz: cannot read the archive",
         files={"sample.tar.gz": tar_gz(cifar_folder())[:20_000]}),
    case("data-archive-not-gzip", "optimize --study cifar --data-dir {tmp}/sample.tar.gz",
         "{tmp}/sample.tar.gz: cannot read the archive", files={"sample.tar.gz": b"<html>404</html>\n"}),
    case("data-batch-truncated", "optimize --study cifar --data-dir {tmp}",
         f"CIFAR-10 file data_batch_1.bin is {2 * RECORD - 1} bytes, not a whole number of {RECORD}-byte records",
         files=cifar_folder(data_batch_1=cifar_batch(2)[:-1])),
    case("data-batch-empty", "optimize --study cifar --data-dir {tmp}",
         "CIFAR-10 file test_batch.bin is 0 bytes", files=cifar_folder(test_batch=b"")),
    case("data-batch-size-not-a-record-multiple", "optimize --study cifar --data-dir {tmp}",
         f"CIFAR-10 file data_batch_3.bin is {3 * RECORD + 100} bytes, not a whole number of {RECORD}-byte",
         files=cifar_folder(data_batch_3=cifar_batch(3) + bytes(100))),
    case("data-batch-in-archive-truncated", "optimize --study cifar --data-dir {tmp}/sample.tar.gz",
         f"CIFAR-10 file data_batch_2.bin is {RECORD // 2} bytes",
         files={"sample.tar.gz": tar_gz(cifar_folder(data_batch_2=cifar_batch(1)[:RECORD // 2]))}),
    case("data-label-out-of-range", "optimize --study cifar --data-dir {tmp}",
         "CIFAR-10 file test_batch.bin: record 1 has label 10, outside 0-9",
         files=cifar_folder(test_batch=cifar_batch(2, labels=(3, 10)))),
    case("data-label-out-of-range-in-archive", "optimize --study cifar --data-dir {tmp}/sample.tar.gz",
         "CIFAR-10 file data_batch_5.bin: record 0 has label 255, outside 0-9",
         files={"sample.tar.gz": tar_gz(cifar_folder(data_batch_5=cifar_batch(2, labels=(255,))))}),
    case("data-test-batch-missing", "optimize --study cifar --data-dir {tmp}",
         f"{{tmp}}/{FOLDER}: CIFAR-10 files missing: test_batch.bin",
         files={f"{FOLDER}/data_batch_1.bin": cifar_batch()}),
    # --- a user's images --------------------------------------------------------------------------------------
    case("images-without-path", "optimize --study images",
         "data.name images needs the images: --set data.path=FOLDER"),
    case("images-missing-folder", IMAGES + "nope", "no images at {tmp}/nope: the folder (or CSV file) does not exist"),
    case("images-empty-folder", IMAGES + "photos", "{tmp}/photos is empty: expected a subfolder of images per class",
         setup=empty_photos),
    case("images-files-but-no-class-folders", IMAGES + "photos", "{tmp}/photos holds files but no class folders",
         files={"photos/a.png": png(), "photos/b.png": png(9)}),
    case("images-one-class", IMAGES + "photos", "{tmp}/photos: one class ('cat'); nothing to learn",
         files={f"photos/cat/{i}.png": png(i) for i in range(6)}),
    case("images-class-folder-without-images", IMAGES + "photos",
         "{tmp}/photos: the class folder 'bird' has no images", files=photos(bird__notes_txt=b"no pictures here")),
    case("images-corrupt-image-is-named", IMAGES + "photos", "cannot decode image {tmp}/photos/dog/broken.png",
         files=photos(dog__broken_png=png()[:40]), absent="regsearch.journal"),
    case("images-text-file-named-like-an-image", IMAGES + "photos",
         "cannot decode image {tmp}/photos/cat/x.png: not an image Pillow can read",
         files=photos(cat__x_png=b"hello, not a picture")),
    case("images-csv-row-naming-a-missing-file", IMAGES + "t.csv",
         "{tmp}/t.csv: line 4 (the header is line 1): no image file at {tmp}/photos/cat/gone.png",
         files={**photos(), "t.csv": "path,label\nphotos/cat/0.png,cat\nphotos/dog/0.png,dog\n"
                                     "photos/cat/gone.png,cat\n"}, absent="regsearch.journal"),
    case("images-csv-without-the-path-column", IMAGES + "t.csv",
         "{tmp}/t.csv: unknown path column 'path'", files={**photos(), "t.csv": "file,label\nphotos/cat/0.png,cat\n"}),
    case("images-test-class-unknown", IMAGES + "photos --set data.test_path=held",
         "{tmp}/held: class 'bird' is not a class of the training images (cat, dog)",
         files={**photos(), "held/bird/0.png": png()}),
    case("images-size-zero", IMAGES + "photos --set data.image_size=0", "data.image_size: must be >= 8; got 0",
         files=photos()),
    case("images-size-absurd", IMAGES + "photos --set data.image_size=100000",
         "data.image_size: must be <= 1024; got 100000", files=photos()),
    case("images-resnet18-with-batchnorm-insertion-left-on", IMAGES + "photos --set model.name=resnet18",
         "regularizers.batchnorm: no batchnorm site matches Linear, Conv1d, Conv2d, Conv3d in this model: each of "
         "its 20 such layers is already followed by a BatchNorm (set regularizers.batchnorm.enabled=false)",
         files=photos()),
    case("images-channels-two", IMAGES + "photos --set data.channels=2", "data.channels: unknown value",
         files=photos()),
    case("images-size-with-digits", "optimize --study digits --set data.image_size=32",
         "data.image_size: only images have image_size (data.name is digits); set data.name=images"),
    case("images-folder-given-to-the-cifar-study", "optimize --study cifar --data-dir {tmp}/photos",
         "a folder of images in class subfolders is read by --study images --data-dir {tmp}/photos", files=photos()),
    case("images-unwritable-cache", IMAGES + "photos",
         "cannot write the image cache in {tmp}/cache/images: Permission denied (set REGSEARCH_CACHE to a writable "
         "folder)", files=photos(), setup=read_only_cache, process=True),
]

# --- searched training and model keys (issue 14): kept apart from the table above to ease merging --------------
CASES += [
    case("search-range-low-above-high", ["optimize", "--study", "digits", "--set", "training.batch_size=[128,32]"],
         "--set training.batch_size=[128,32]: training.batch_size: low must not exceed high; got [128, 32]"),
    case("search-range-on-a-word-key", ["optimize", "--study", "digits", "--set", "training.optimizer=[sgd,adamw]"],
         "training.optimizer: a range searches a numeric key (optimizer is 'sgd' by default); to search it, write "
         "{choices: [...]}"),
    case("search-range-on-a-list-key", ["optimize", "--study", "digits", "--set", "model.hidden={low: 16, high: 64}"],
         "model.hidden: a range searches a numeric key (hidden is (256, 256) by default)"),
    case("search-empty-choices", ["optimize", "--study", "digits", "--set", "training.schedule={choices: []}"],
         "training.schedule.choices: expected a non-empty list of values; got []"),
    case("search-choice-of-the-wrong-type", ["optimize", "--study", "digits", "--set", "training.epochs={choices: [2, many]}"],
         "--set training.epochs={choices: [2, many]}: training.epochs: expected a whole number; got 'many'"),
    case("search-choice-not-a-value", ["optimize", "--study", "digits", "--set", "training.optimizer={choices: [{a: 1}]}"],
         "training.optimizer.choices: a choice is a number, a string, true/false, null or a list of those; got "
         "{'a': 1}"),
    case("search-choice-twice", ["optimize", "--study", "digits", "--set", "training.optimizer={choices: [sgd, sgd]}"],
         "training.optimizer.choices: 'sgd' is given twice"),
    case("search-choices-with-a-range-key", ["optimize", "--study", "digits", "--set",
                                             "training.batch_size={choices: [32, 64], log: true}"],
         "training.batch_size: {choices: [...]} takes no other keys; got log"),
    case("search-step-on-a-log-range", "optimize --study {tmp}/s.yaml",
         "s.yaml: training.momentum.step: a log-scale range takes no step (Optuna samples it continuously)",
         files={"s.yaml": "training: {momentum: {low: 0.01, high: 0.9, log: true, step: 0.01}}\n"}),
    case("search-step-off-the-grid", "optimize --study {tmp}/s.yaml",
         "s.yaml: training.batch_size.step: high - low must be a whole number of steps; got [16, 100] step 32",
         files={"s.yaml": "training: {batch_size: {low: 16, high: 100, step: 32}}\n"}),
    case("search-low-without-high", ["optimize", "--study", "digits", "--set", "training.batch_size={low: 16}"],
         "training.batch_size: expected a number, [low, high] or {low, high, log, step} (low and high both given); "
         "got {'low': 16}"),
    case("search-whole-number-key-with-a-fraction", ["optimize", "--study", "digits", "--set",
                                                     "training.batch_size=[16.5,64]"],
         "training.batch_size: expected whole numbers; got [16.5, 64]"),
    case("search-bound-out-of-range", ["optimize", "--study", "digits", "--set", "training.epochs=[0,3]"],
         "training.epochs: must be >= 1; got 0"),
    case("search-model-choice-the-model-refuses", ["optimize", "--study", "digits", "--set",
                                                   "model.hidden={choices: [[32], [0]]}"],
         "model.hidden: hidden must be a list of positive whole numbers; got [0]"),
    # --- the model: weights files, import paths, drop_path ---------------------------------------------------
    case("model-weights-of-another-shape", TINY_MLP + "--set model.weights=w.pth",
         "model.weights: {tmp}/w.pth: 1.weight is [32, 64] in the file but [16, 64] in the model",
         files={"w.pth": state_dict_file(**{"1_weight": (32, 64), "1_bias": (32,), "3_weight": (10, 32),
                                            "3_bias": (10,)})}),
    case("model-weights-of-another-layout", TINY_MLP + "--set model.weights=w.pth",
         "model.weights: {tmp}/w.pth does not fit the model (Sequential): 2 tensors missing from the file (1.weight, "
         "1.bias); 1 tensor in the file but not in the model (fc.weight)",
         files={"w.pth": state_dict_file(fc_weight=(10, 16))}),
    case("model-weights-missing", TINY_MLP + "--set model.weights=nowhere.pth",
         "model.weights: {tmp}/nowhere.pth does not exist"),
    case("model-weights-not-a-state-dict", TINY_MLP + "--set model.weights=w.pth",
         "model.weights: {tmp}/w.pth is not a state dict torch can load safely (weights_only)",
         files={"w.pth": b"these are not tensors"}),
    case("model-weights-safetensors-truncated", TINY_MLP + "--set model.weights=w.safetensors",
         "model.weights: {tmp}/w.safetensors is not a readable safetensors file", files={"w.safetensors": b"\x08"}),
    case("model-freeze-without-weights", TINY_MLP + "--set model.freeze_epochs=2",
         "model.freeze_epochs: needs model.weights: a frozen backbone of random weights learns nothing"),
    case("model-import-path-that-does-not-import", "optimize --study digits --set model.name=no_such_package_here:make",
         "model.name: 'no_such_package_here:make' does not import: no module named 'no_such_package_here' is "
         "installed (or on PYTHONPATH)"),
    case("model-import-path-without-the-callable", "optimize --study digits --set model.name=regsearch.models:resnet99",
         "model.name: module 'regsearch.models' has no 'resnet99'"),
    case("model-drop-path-without-residual-branches", ["optimize", "--study", "digits", "--set",
                                                       "regularizers.drop_path={enabled: true}"],
         "regularizers.drop_path: drop_path needs residual branches: the model (Sequential) has no module with a "
         "drop_prob"),
    case("model-resnet-on-flat-data", ["optimize", "--study", "digits", "--set", "model={name: resnet18}"],
         "model: resnet18 needs image inputs (C, H, W); the data has rows of shape (64,)"),
    # a budget in steps sets the epochs once for the study: a searched one would be recorded but never trained
    case("search-steps-as-choices", "optimize --study {tmp}/s.yaml --n-trials 1", bounded=False,
         message="s.yaml: training.steps: cannot be searched (the epochs are set once from it",
         files={"s.yaml": "data: {name: digits}\ntraining: {steps: {choices: [100, 400]}}\n"}),
    case("search-steps-as-a-range", "optimize --study {tmp}/s.yaml --n-trials 1", bounded=False,
         message="s.yaml: training.steps: cannot be searched (the epochs are set once from it",
         files={"s.yaml": "data: {name: digits}\ntraining: {steps: [100, 2000]}\n"}),
]


# --- a study remembers itself (issue 25): a rerun asking another question is refused ------------------------
CASES += [
    case("plugin-option-not-a-bool", ["optimize", "--study", "digits", "--set", "regularizers.dropout.per_site=often"],
         "regularizers.dropout.per_site: expected true or false; got 'often'"),
    case("plugin-option-not-a-choice", ["optimize", "--study", "digits", "--set",
                                        "regularizers.batchnorm.position=middle"],
         "regularizers.batchnorm.position: unknown value 'middle'; known: after_activation, before_activation"),
    case("plugin-option-not-names", ["optimize", "--study", "digits", "--set", "regularizers.dropout.types=[ReLU, 3]"],
         "regularizers.dropout.types.1: expected a string; got 3"),
    case("record-data-dir-for-a-study-without-a-folder", "optimize --study digits --data-dir {tmp}",
         "--data-dir {tmp}: study 'digits' reads no folder (its data is 'digits')"),
    case("record-resume-with-another-split", ["optimize", "--study", "digits", "--set", "data.val_fraction=0.3"],
         "study 'digits' was made with data.val_fraction=0.2; this run has 0.3. A study answers one question",
         keep=True),
    case("record-resume-with-another-model", ["optimize", "--study", "digits", "--set", "model.hidden=[64]"],
         "study 'digits' was made with model.hidden=[256, 256]; this run has [64]", keep=True),
    case("record-resume-with-another-seed", "optimize --study digits --seed 3",
         "study 'digits' was made with seed=0; this run has 3", keep=True),
    case("record-confirm-with-another-range", ["confirm", "--study", "digits", "--set", "regularizers.l2.weight_decay=[0.1,1]"],
         "study 'digits' was made with regularizers.l2.weight_decay=[1e-06, 0.01]; this run has [0.1, 1]",
         keep=True),
    case("record-study-made-from-another-file", "optimize --study cifar --study-name digits",
         "study 'digits' was made from ", keep=True),
]


# --- what each regularizer is worth (issue 24): an ablation needs a single objective, a baseline, a regularizer --
CASES += [
    case("ablate-pareto-study", ["optimize", "--study", "digits", "--set", "search.objective=pareto", "--set",
                                 "search.confirm.ablate=true"],
         "search.confirm.ablate needs a single objective: a pareto study's confirmed winner is not what it chose"),
    case("ablate-without-baseline", ["optimize", "--study", "digits", "--set", "search.baseline=false", "--set",
                                     "search.confirm.ablate=true"],
         "search.confirm.ablate needs search.baseline: true"),
    case("ablate-no-regularized-winner", "confirm --study digits --ablate",
         "--ablate: study 'digits' has no regularized configuration, only its baseline: nothing to remove",
         keep=True),
]


# --------------------------------------------------------------------------------------------------------------
# running a case


@dataclass
class Outcome:
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None = None


def invoke(args: list[str]) -> Outcome:
    result = CliRunner().invoke(cli, args)
    return Outcome(result.exit_code, result.stdout, result.stderr, result.exception)


def run_without_dac(args: list[str], cwd: Path) -> Outcome:
    """The real executable with file-permission checks in force even for root (tests often run as root)."""
    exe = os.path.join(os.path.dirname(sys.executable), "regsearch")
    command = without_dac([exe, *args])
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=120)
    return Outcome(done.returncode, done.stdout, done.stderr)




def stored(folder: Path) -> tuple[list[tuple], int]:
    """The digits study's trials in the folder's journal, and the number of MLflow runs in its mlflow.db."""
    storage = optuna.storages.journal.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(folder / "regsearch.journal")))
    trials = [(t.number, t.state.name, t.values, t.params)
              for t in optuna.load_study(study_name="digits", storage=storage).trials]
    with sqlite3.connect(folder / "mlflow.db") as db:
        runs = db.execute("select count(*) from runs").fetchone()[0]
    return trials, runs


@pytest.fixture(scope="module")
def kept_study(tmp_path_factory, mlflow_store) -> Path:
    """A folder where a tiny real digits study ran (its journal, mlflow.db and artifacts); `keep` cases copy it.
    The copies' experiment still names this folder for artifacts; a case counts its own copy's trials and runs."""
    folder = tmp_path_factory.mktemp("kept-study")
    shutil.copy(mlflow_store, folder / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("REGSEARCH_CACHE", str(folder / "cache"))
        mp.setattr(_registry, "_default", None)
        first = invoke(["optimize", "--study", "digits", *TINY_RUN])
    assert first.exit_code == 0, first.stderr
    return folder


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_2(case: Case, tmp_path, monkeypatch, mlflow_store, request):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REGSEARCH_CACHE", str(tmp_path / "cache"))  # no shared download cache
    # a fresh process-wide registry: a case's plugins meet only the built-ins, and leave with the case
    monkeypatch.setattr(_registry, "_default", None)
    tmp = str(tmp_path)
    # every case runs where an MLflow store exists: a wrongly accepted input or a `keep` study skips its migrations
    shutil.copy(mlflow_store, tmp_path / "mlflow.db")
    for name, content in case.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content.replace("{tmp}", tmp))
    if case.setup:
        case.setup(tmp_path)
    before = None
    if case.keep:
        shutil.copytree(request.getfixturevalue("kept_study"), tmp_path, dirs_exist_ok=True)
        before = stored(tmp_path)
        # the baseline ran; the recipe enqueued after it waits for a later run
        assert [t[1] for t in before[0]] == ["COMPLETE", "WAITING"] and before[1] >= 1

    args = [a.replace("{tmp}", tmp) for a in case.args]
    result = run_without_dac(args, tmp_path) if case.process else invoke(args)

    everything = result.stdout + result.stderr
    assert result.exit_code == 2, everything
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in everything
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), result.stderr
    assert case.message.replace("{tmp}", tmp) in lines[0]
    assert result.stdout == ""
    if case.secret:
        assert case.secret not in everything
    if case.absent:
        assert not (tmp_path / case.absent).exists()
    if case.keep:
        assert stored(tmp_path) == before
