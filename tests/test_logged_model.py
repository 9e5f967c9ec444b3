"""The logged best model takes what a user has: raw digits pixels, uint8 images, a table's rows; returns labels.

The end-to-end cases log the model on the session's real `mlflow server` and load it in a fresh process, in
another folder, where regsearch cannot be imported: it must carry everything it needs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from regsearch.data._tensors import Batcher, TensorData, load_dataset
from regsearch.tracking._predictor import Predictor
from tests.conftest import REPO, require

TABULAR = REPO.parent / "shared" / "datasets" / "tabular"


def raw_digits_test_split() -> tuple[np.ndarray, np.ndarray]:
    """The digits test split as a user has it: sklearn's pixel values 0..16 (float64), split as regsearch splits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    _, x_test, _, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return x_test, y_test


# --------------------------------------------------------------------------------------------------------------
# raw inputs become exactly what the model was trained and tested on


def test_raw_digits_pixels_become_the_models_test_inputs_bit_for_bit():
    data = load_dataset("digits", val_fraction=0.2, seed=0)
    assert data.scale == 1 / 16
    x_raw, y_raw = raw_digits_test_split()
    predictor = Predictor.of(torch.nn.Linear(64, 10), data)
    assert torch.equal(predictor.inputs(x_raw), data.x_test)
    assert torch.equal(predictor.inputs(x_raw.astype(np.int64)), data.x_test)  # integer pixels too
    assert np.array_equal(y_raw, data.y_test.numpy())


def test_uint8_images_are_normalised_exactly_as_the_training_batches():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=gen)
    data = TensorData.from_arrays(images, torch.arange(40) % 4)
    predictor = Predictor.of(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 4)), data)
    assert torch.equal(predictor.inputs(images.numpy()), Batcher(data).inputs(images))
    with pytest.raises(ValueError, match=r"expected inputs of shape \(N, 3, 8, 8\); got \(2, 8, 8, 3\)"):
        predictor.predict(images[:2].permute(0, 2, 3, 1).numpy())


def test_image_files_pil_images_and_arrays_become_the_studys_test_inputs(hymenoptera, tmp_path, monkeypatch):
    from PIL import Image

    from regsearch.data.images import list_images, load_images

    monkeypatch.setenv("REGSEARCH_CACHE", str(tmp_path / "cache"))
    data = load_images(hymenoptera / "train", test_path=hymenoptera / "val", image_size=24)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 24 * 24, 2))
    predictor = Predictor.of(model, data)
    paths = list(list_images(hymenoptera / "val").paths)
    expected = predictor.inputs(data.x_test.numpy())
    assert torch.equal(predictor.inputs(paths), expected)  # the files, decoded and resized as the study did
    assert torch.equal(predictor.inputs([Image.open(p) for p in paths[:3]]), expected[:3])
    # an array is the photo decoded at full size (not at the JPEG's reduced scale a file or fresh PIL image allows)
    assert (predictor.inputs(np.asarray(Image.open(paths[0]))) - expected[:1]).abs().mean() < 0.05
    assert set(predictor.predict(paths)) <= {"ants", "bees"}


def test_a_tables_rows_give_its_own_labels_and_proba_a_column_per_class(tmp_path):
    from regsearch.data.table import load_table

    path = tmp_path / "pets.csv"
    rows = ["weight,colour,kind"] + [f"{i},{'red' if i % 3 else 'blue'},{'cat' if i % 2 else 'dog'}"
                                     for i in range(40)]
    path.write_text("\n".join(rows) + "\n")
    data = load_table(path, "kind")
    torch.manual_seed(0)
    predictor = Predictor.of(torch.nn.Linear(data.x_train.shape[1], 2), data)
    raw = pd.read_csv(path).drop(columns="kind")  # weight read as integers here, as strings by regsearch
    labels = predictor.predict(raw)
    assert set(labels) <= {"cat", "dog"} and len(labels) == 40
    proba = predictor.predict(raw, output="proba")
    assert list(proba.columns) == ["cat", "dog"]
    assert np.allclose(proba.sum(axis=1), 1.0)
    assert list(np.asarray(proba.columns)[proba.to_numpy().argmax(1)]) == list(labels)
    example = predictor.example(data)  # the input example MLflow shows: typical values of each column
    assert list(example.columns) == ["weight", "colour"] and len(predictor.predict(example)) == 2
    with pytest.raises(ValueError, match="output must be one of label, proba; got 'probs'"):
        predictor.predict(raw, output="probs")


# --------------------------------------------------------------------------------------------------------------
# end to end: logged on a real MLflow server, loaded in a fresh process without regsearch


LOAD = """
import json, sys
sys.modules["regsearch"] = None  # the logged model must not need regsearch
import mlflow, numpy as np, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
{read}
labels = model.predict(x)
proba = model.predict(x[:5], params={{"output": "proba"}})
print(json.dumps({{"right": int((np.asarray(labels) == np.asarray(y)).sum()), "n": len(y),
                  "labels": sorted({{str(v) for v in labels}}),
                  "proba_columns": [str(c) for c in proba.columns],
                  "proba_agrees": bool((np.asarray(proba.columns)[proba.to_numpy().argmax(1)]
                                        == np.asarray(labels[:5])).all())}}))
"""


def predict_elsewhere(tmp_path: Path, tracking_uri: str, model_uri: str, read: str) -> dict:
    """Load `model_uri` in a fresh process in an empty folder (regsearch blocked) and predict what `read` reads."""
    folder = tmp_path / f"elsewhere-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(folder), "MLFLOW_TRACKING_URI": tracking_uri}
    done = subprocess.run([sys.executable, "-c", LOAD.format(read=textwrap.dedent(read)), model_uri], check=False,
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def logged_model_uri(tracking_uri: str, experiment: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.search_logged_models(experiment_ids=[client.get_experiment_by_name(experiment).experiment_id])
    assert [m.name for m in found] == ["best_model"]
    return found[0].model_uri


@pytest.mark.slow
def test_digits_model_registered_from_the_cli_takes_raw_pixels(mlflow_server, in_tmp, restore_logging):
    import optuna
    from click.testing import CliRunner
    from mlflow import MlflowClient

    from regsearch.cli import cli

    name = f"digits_{uuid.uuid4().hex[:8]}"
    registered = f"regsearch-digits-{uuid.uuid4().hex[:8]}"
    result = CliRunner().invoke(cli, [
        "optimize", "--study", "digits", "--study-name", name, "--n-trials", "2", "--storage", "s.journal",
        "--tracking-uri", mlflow_server, "--device", "cpu", "--set", "training.epochs=3",
        "--register-model", registered])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(in_tmp / "s.journal"))))
    test = study.user_attrs["best_test"]

    versions = MlflowClient(tracking_uri=mlflow_server).search_model_versions(f"name = '{registered}'")
    assert [v.version for v in versions] == ["1"]
    assert versions[0].tags == {"regsearch.study": name, "regsearch.best_trial": str(test["trial"]),
                                "regsearch.test_acc": str(test["test_acc"])}
    assert versions[0].run_id == test["mlflow_run_id"]

    x, y = raw_digits_test_split()
    np.save(in_tmp / "x.npy", x)
    np.save(in_tmp / "y.npy", y)
    got = predict_elsewhere(in_tmp, mlflow_server, f"models:/{registered}/1",
                            f"x, y = np.load({str(in_tmp / 'x.npy')!r}), np.load({str(in_tmp / 'y.npy')!r})")
    assert got["n"] == len(y) == 450
    assert got["right"] == round(test["test_acc"] * len(y)), got
    assert got["proba_columns"] == [str(i) for i in range(10)] and got["proba_agrees"]


@pytest.mark.slow
def test_cifar_model_takes_uint8_images(mlflow_server, cifar_sample, in_tmp):
    import regsearch
    from regsearch.data.cifar import load_cifar10

    name = f"cifar_{uuid.uuid4().hex[:8]}"
    study = regsearch.optimize("cifar", n_trials=1, study_name=name, storage="s.journal", tracking_uri=mlflow_server,
                               data_dir=str(cifar_sample), device="cpu",
                               overrides=[("data.train_size", "600"), ("training.epochs", "1")])
    test = study.user_attrs["best_test"]
    _, _, x_test, y_test = load_cifar10(cifar_sample)
    assert x_test.dtype == np.uint8 and x_test.shape[1:] == (3, 32, 32)
    np.save(in_tmp / "x.npy", x_test)
    np.save(in_tmp / "y.npy", y_test)
    got = predict_elsewhere(in_tmp, mlflow_server, logged_model_uri(mlflow_server, name),
                            f"x, y = np.load({str(in_tmp / 'x.npy')!r}), np.load({str(in_tmp / 'y.npy')!r})")
    assert got["n"] == len(y_test)
    assert got["right"] == round(test["test_acc"] * len(y_test)), got


@pytest.mark.slow
def test_adult_model_takes_the_tables_rows_and_returns_its_labels(mlflow_server, in_tmp):
    import regsearch
    from regsearch.data.table import load_table

    train, test_file = TABULAR / "adult-train.csv", TABULAR / "adult-test.csv"
    require(train.is_file() and test_file.is_file(), f"the shared adult tables are not in {TABULAR}")
    data = load_table(train, "income", test_path=test_file, train_size=4000)
    spec = regsearch.spec_from_dict({"training": {"epochs": 2}, "search": {"first_trial": {}},
                                     "regularizers": {"dropout": {}, "l2": {}}}, name="adult")
    name = f"adult_{uuid.uuid4().hex[:8]}"
    study = regsearch.optimize(spec, n_trials=2, data=data, study_name=name, storage="s.journal",
                               tracking_uri=mlflow_server, device="cpu")
    test = study.user_attrs["best_test"]
    # the test file as a user reads it: pandas' own types, labels ending in a dot as published
    got = predict_elsewhere(in_tmp, mlflow_server, logged_model_uri(mlflow_server, name), f"""
        table = pd.read_csv({str(test_file)!r})
        x, y = table.drop(columns="income"), table["income"].str.strip().str.rstrip(".")
        """)
    assert got["n"] == 16_281
    assert got["right"] == round(test["test_acc"] * 16_281), got
    assert got["labels"] == ["<=50K", ">50K"] and got["proba_columns"] == ["<=50K", ">50K"]


@pytest.mark.slow
def test_image_folder_model_from_the_cli_takes_image_files_and_returns_class_names(mlflow_server, hymenoptera,
                                                                                     in_tmp, monkeypatch):
    """The hymenoptera photographs end to end from the command line, as a user's folder is used."""
    import optuna
    from click.testing import CliRunner

    from regsearch.cli import cli
    from regsearch.data.images import list_images

    monkeypatch.setenv("REGSEARCH_CACHE", str(in_tmp / "cache"))
    name = f"images_{uuid.uuid4().hex[:8]}"
    result = CliRunner().invoke(cli, [
        "optimize", "--study", "images", "--study-name", name, "--n-trials", "1", "--storage", "s.journal",
        "--tracking-uri", mlflow_server, "--device", "cpu", "--set", f"data.path={hymenoptera / 'train'}",
        "--set", f"data.test_path={hymenoptera / 'val'}", "--set", "data.image_size=32",
        "--set", "training.steps=20", "--set", "search.confirm=null"])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(in_tmp / "s.journal"))))
    test = study.user_attrs["best_test"]
    listing = list_images(hymenoptera / "val")
    got = predict_elsewhere(in_tmp, mlflow_server, logged_model_uri(mlflow_server, name),
                            f"x, y = {list(listing.paths)!r}, {[listing.classes[i] for i in listing.labels]!r}")
    assert got["n"] == 40
    assert got["right"] == round(test["test_acc"] * 40), got
    assert set(got["labels"]) <= {"ants", "bees"} and got["proba_columns"] == ["ants", "bees"]


USERS_MODEL = '''
import torch
from torch import nn


def squash(x):
    return torch.tanh(x)


class MyNet(nn.Module):
    """A user's own model, in a file beside their script: importable only from there."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(64, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        return self.out(squash(self.hidden(x)))
'''

USERS_SCRIPT = '''
import json, sys
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import regsearch
from mynet import MyNet

x, y = load_digits(return_X_y=True)
x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
data = regsearch.TensorData.from_arrays(x_train.astype(np.float32), y_train, x_test.astype(np.float32), y_test)
spec = regsearch.spec_from_dict({"training": {"epochs": 3}, "search": {"first_trial": {}},
                                 "regularizers": {"l2": {}}}, name="mine")
study = regsearch.optimize(spec, n_trials=1, data=data, model=lambda: MyNet(), study_name=sys.argv[1],
                           storage="s.journal", tracking_uri=sys.argv[2], device="cpu")
print(json.dumps(study.user_attrs["best_test"]))
'''


@pytest.mark.slow
def test_a_model_class_from_the_users_own_module_travels_with_the_model(mlflow_server, tmp_path):
    """The study runs in another folder than the user's script and module; the model loads in a third one."""
    project, run_in = tmp_path / "project", tmp_path / "run"
    project.mkdir()
    run_in.mkdir()
    (project / "mynet.py").write_text(USERS_MODEL)
    (project / "train.py").write_text(USERS_SCRIPT)
    name = f"mine_{uuid.uuid4().hex[:8]}"
    done = subprocess.run([sys.executable, str(project / "train.py"), name, mlflow_server], check=False, cwd=run_in,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "not logged" not in done.stderr, done.stderr[-3000:]
    test = json.loads(done.stdout.strip().splitlines()[-1])
    x, y = raw_digits_test_split()
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    np.save(tmp_path / "y.npy", y)
    got = predict_elsewhere(tmp_path, mlflow_server, logged_model_uri(mlflow_server, name),
                            f"x, y = np.load({str(tmp_path / 'x.npy')!r}), np.load({str(tmp_path / 'y.npy')!r})")
    assert got["right"] == round(test["test_acc"] * len(y)), got


@pytest.mark.parametrize(("args", "message"), [
    (["--register-model", "team/digits"], "--register-model: a model name without '/' or ':'"),
    (["--set", "search.register_model=7"], "search.register_model: a model name without '/' or ':'"),
])
def test_a_name_the_model_registry_refuses_stops_before_any_training(in_tmp, restore_logging, args, message):
    from click.testing import CliRunner

    from regsearch.cli import cli

    result = CliRunner().invoke(cli, ["optimize", "--study", "digits", "--n-trials", "1", *args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output
    assert not (in_tmp / "regsearch.journal").exists()
