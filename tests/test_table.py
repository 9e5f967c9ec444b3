"""load_table on the real UCI tables (adult, wine quality) and on small bad tables written for each case."""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import sqlite3
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from regsearch._errors import ConfigError, DataError
from regsearch.cli import cli
from regsearch.data.table import load_table
from tests.conftest import REPO, require

TABULAR = REPO.parent / "shared" / "datasets" / "tabular"
NUMERIC_ADULT = ["age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week"]


def shared_table(name: str):
    path = TABULAR / name
    require(path.is_file(), f"the shared table {name} is not at {path}")
    return path


@pytest.fixture(scope="module")
def adult():
    return load_table(shared_table("adult-train.csv"), "income", test_path=shared_table("adult-test.csv"))


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def small_table(rows: int = 40) -> str:
    """x numeric, colour categorical, y in {a, b}."""
    lines = ["x,colour,y"] + [f"{i},{'red' if i % 3 else 'blue'},{'ab'[i % 2]}" for i in range(rows)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# the real tables


def test_adult_shapes_classes_and_dotted_test_labels(adult):
    assert adult.name == "adult-train"
    assert len(adult.x_train) + len(adult.x_val) == 32_561 and len(adult.x_val) == 6_512
    assert adult.x_test.shape[0] == 16_281
    assert adult.x_train.shape[1] == adult.x_val.shape[1] == adult.x_test.shape[1]
    assert adult.classes == ("<=50K", ">50K") and adult.num_classes == 2
    # the test file writes "<=50K." and ">50K.": the same classes as in training, counted as published
    assert torch.bincount(adult.y_test).tolist() == [12_435, 3_846]
    assert adult.columns == ("age", "workclass", "fnlwgt", "education", "education-num", "marital-status",
                             "occupation", "relationship", "race", "sex", "capital-gain", "capital-loss",
                             "hours-per-week", "native-country")
    for x in (adult.x_train, adult.x_val, adult.x_test):
        assert x.dtype == torch.float32 and torch.isfinite(x).all()
    # stratified: both splits keep the file's share of >50K (24.1 %)
    for y in (adult.y_train, adult.y_val):
        assert abs(y.float().mean().item() - 7_841 / 32_561) < 0.002


def test_adult_statistics_come_from_the_training_split_only(adult):
    columns = adult.preprocessor.named_steps["columns"]
    scaler = columns.named_transformers_["numeric"].named_steps["scale"]
    n = len(NUMERIC_ADULT)
    # standardised with the training rows' own mean and std: exactly 0 and 1 there, not on validation
    train, val = adult.x_train[:, :n].double(), adult.x_val[:, :n].double()
    assert train.mean(0).abs().max() < 1e-4 and (train.std(0, unbiased=False) - 1).abs().max() < 1e-4
    assert val.mean(0).abs().max() > 1e-3
    raw = pd.read_csv(shared_table("adult-train.csv"), skipinitialspace=True)
    assert not np.allclose(scaler.mean_, raw[NUMERIC_ADULT].mean().to_numpy(), rtol=0, atol=1e-6)
    imputer = columns.named_transformers_["categorical"].named_steps["impute"]
    assert list(imputer.statistics_[:1]) == ["Private"]  # workclass, whose missing values are " ?"


def test_adult_preprocessor_takes_raw_rows_and_ignores_new_categories(adult):
    raw = pd.read_csv(shared_table("adult-test.csv"), dtype=str, keep_default_na=False).head(3)
    raw.loc[0, "native-country"] = " Atlantis"
    raw.loc[1, "workclass"] = " ?"
    preprocessor = pickle.loads(pickle.dumps(adult.preprocessor))  # it travels with a logged model
    x = preprocessor.transform(raw)
    assert x.dtype == np.float32 and x.shape == (3, adult.x_test.shape[1]) and np.isfinite(x).all()
    np.testing.assert_array_equal(x[1:], adult.x_test[1:3].numpy())
    names = adult.preprocessor.named_steps["columns"].get_feature_names_out()
    country = np.array(["native-country" in name for name in names])
    assert x[0, country].sum() == 0 and x[2, country].sum() == 1


def test_logistic_regression_on_adult_beats_080(adult):
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=1000).fit(adult.x_train.numpy(), adult.y_train.numpy())
    accuracy = model.score(adult.x_test.numpy(), adult.y_test.numpy())
    assert accuracy > 0.80, accuracy


def test_wine_quality_numeric_labels_and_no_test_split():
    data = load_table(shared_table("winequality-white.csv"), "quality", seed=1)
    assert data.classes == (3, 4, 5, 6, 7, 8, 9) and all(type(c) is int for c in data.classes)
    assert data.x_train.shape == (3_918, 11) and data.x_val.shape == (980, 11)
    assert data.x_test is None and data.y_test is None
    assert set(data.y_train.tolist()) == set(range(7))  # stratified: the 5 wines of quality 9 are split too


def test_rows_that_repeat_training_rows_are_warned_of(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="regsearch")
    load_table(shared_table("winequality-white.csv"), "quality")  # 937 of its 4,898 rows are copies of another
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and re.match(r"winequality-white.csv: [1-9]\d% of the validation rows repeat", said[0])
    caplog.clear()
    table = small_table()
    load_table(write(tmp_path, "t.csv", table), "y")
    assert not caplog.records  # every row distinct: nothing to say
    load_table(write(tmp_path, "t.csv", table), "y", test_path=write(tmp_path, "test.csv", table))
    assert [r.getMessage() for r in caplog.records] == [
        "t.csv: 80% of the test rows repeat a training row's inputs exactly; test accuracy on them measures memory, "
        "not generalization (duplicate records? drop them from the files if so)"]


def test_group_repeats_keeps_copies_of_a_row_on_one_side_of_the_split_and_of_each_fold(caplog):
    from regsearch.data._tensors import cv_folds, fold_split
    from regsearch.data.table import seen_rows

    caplog.set_level(logging.WARNING, logger="regsearch")
    plain = load_table(shared_table("winequality-white.csv"), "quality")
    assert seen_rows(plain.x_train, plain.x_val)[0].mean() > 0.2  # the copies straddle a plain split
    caplog.clear()
    wine = load_table(shared_table("winequality-white.csv"), "quality", group_repeats=True)
    assert not caplog.records and seen_rows(wine.x_train, wine.x_val)[0].mean() == 0
    assert len(wine.y_train) + len(wine.y_val) == 4_898 and abs(len(wine.y_val) - 980) < 40
    assert set(wine.y_val.tolist()) == set(range(7))  # still stratified, the 5 wines of quality 9 included
    for train, val in cv_folds(wine, 5, seed=3):
        fold = fold_split(wine, train, val)
        assert seen_rows(fold.x_train, fold.x_val)[0].mean() == 0
    with pytest.raises(ConfigError, match="folds must be between 2 and 1980 .half the 3961 distinct rows"):
        cv_folds(wine, 1981, seed=3)


def test_a_table_without_repeats_splits_as_before_and_group_repeats_takes_one_and_the_same_row_together(tmp_path):
    from sklearn.model_selection import train_test_split

    path = write(tmp_path, "t.csv", small_table(200))
    data = load_table(path, "y", seed=5)  # the split stored studies resume on: sklearn's stratified split
    labels = np.array([i % 2 for i in range(200)])
    _, val = train_test_split(np.arange(200), test_size=40, random_state=5, stratify=labels)
    assert sorted(data.x_val[:, 0].tolist()) == sorted(data.preprocessor.transform(
        pd.read_csv(path).iloc[val])[:, 0].tolist())
    # `1`, `1.0` and ` 1` are one row to the network, so they are one group to the split (with the file's `1,red,b`)
    rows = ["x,colour,y"] + [f"{v},red,a" for v in ("1", "1.0", " 1", "1.00")] + small_table(60).splitlines()[1:]
    for seed in range(4):
        grouped = load_table(write(tmp_path, "g.csv", "\n".join(rows) + "\n"), "y", group_repeats=True, seed=seed)
        one = grouped.preprocessor.transform(pd.DataFrame({"x": ["1"], "colour": ["red"]}))[0, 0]
        sides = [(x[:, 0] == one).sum().item() for x in (grouped.x_train, grouped.x_val)]
        assert sorted(sides) == [0, 5], sides


def test_group_repeats_with_train_size_and_on_a_table_of_one_row_repeated(tmp_path):
    from regsearch.data.table import seen_rows

    twice = small_table(100) + small_table(100).split("\n", 1)[1]  # every row twice
    data = load_table(write(tmp_path, "t.csv", twice), "y", group_repeats=True, train_size=60)
    assert len(data.y_train) + len(data.y_val) == 60 and seen_rows(data.x_train, data.x_val)[0].mean() == 0
    same = "x,colour,y\n" + "1,red,a\n1,red,b\n" * 20
    with pytest.raises(DataError, match="1 distinct input rows are too few to split off a validation set"):
        load_table(write(tmp_path, "same.csv", same), "y", group_repeats=True)


# --------------------------------------------------------------------------------------------------------------
# reading, labels, splits on small tables


@pytest.mark.parametrize("name, sep", [("t.tsv", "\t"), ("t.tab", "\t"), ("t.txt", "\t"), ("t.csv", ";")])
def test_tab_and_semicolon_separated(tmp_path, name, sep):
    data = load_table(write(tmp_path, name, small_table().replace(",", sep)), "y")
    assert data.columns == ("x", "colour") and data.classes == ("a", "b")
    assert data.x_train.shape[1] == 3  # x, colour=blue, colour=red


def test_missing_values_blank_lines_and_spaces(tmp_path):
    rows = ["x, colour, y", " 1, red, a", " ?, ?, b", "NaN,, a", "", " 4, blue , b"] + ["5,red,a", "6,blue,b"] * 5
    data = load_table(write(tmp_path, "t.csv", "\n".join(rows) + "\n"), "y", val_fraction=0.25)
    assert len(data.x_train) + len(data.x_val) == 14  # the blank line is no row
    assert torch.isfinite(data.x_train).all() and torch.isfinite(data.x_val).all()
    categories = data.preprocessor.named_steps["columns"].named_transformers_["categorical"]["onehot"].categories_
    assert list(categories[0]) == ["blue", "red"]


def test_integer_labels_including_minus_one(tmp_path):
    text = "x,y\n" + "".join(f"{i},{1 if i % 2 else -1}\n" for i in range(30))
    test = write(tmp_path, "test.csv", "x,y\n1,1.\n2,-1\n3, 1\n")
    data = load_table(write(tmp_path, "t.csv", text), "y", test_path=test)
    assert data.classes == (-1, 1)
    assert data.y_test.tolist() == [1, 0, 1]


def test_unknown_category_in_the_test_file_transforms(tmp_path):
    test = write(tmp_path, "test.csv", "x,colour,y\n1,green,a\n2,red,b\n")
    data = load_table(write(tmp_path, "t.csv", small_table()), "y", test_path=test)
    assert data.x_test[0, 1:].tolist() == [0.0, 0.0] and data.x_test[1, 1:].tolist() == [0.0, 1.0]


def test_features_id_columns_and_declared_categorical(tmp_path):
    text = "id,x,code,colour,y\n" + "".join(f"{i},{i * 0.5},{i % 3},{'rg'[i % 2]},{'ab'[i % 2]}\n"
                                            for i in range(30))
    path = write(tmp_path, "t.csv", text)
    data = load_table(path, "y", id_columns=["id"], categorical=["code", "colour"])
    assert data.columns == ("x", "code", "colour") and data.x_train.shape[1] == 1 + 3 + 2
    data = load_table(path, "y", features=["code", "x"])
    assert data.columns == ("code", "x") and data.x_train.shape[1] == 2


def test_split_is_seeded_and_train_size_caps_it(tmp_path):
    path = write(tmp_path, "t.csv", small_table(200))
    one, again = load_table(path, "y", seed=3), load_table(path, "y", seed=3)
    assert torch.equal(one.x_val, again.x_val) and torch.equal(one.x_train, again.x_train)
    assert not torch.equal(load_table(path, "y", seed=4).x_val, one.x_val)
    capped = load_table(path, "y", train_size=50, val_fraction=0.2)
    assert (len(capped.x_train), len(capped.x_val)) == (40, 10)


def test_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    frame = pd.DataFrame({"x": np.arange(30.0), "flag": [True, False] * 15, "y": [1, 2, 3] * 10})
    frame.loc[4, "x"] = np.nan
    frame.to_parquet(tmp_path / "t.parquet")
    data = load_table(tmp_path / "t.parquet", "y")
    assert data.classes == (1, 2, 3) and data.x_train.shape[1] == 3 and torch.isfinite(data.x_train).all()


def test_damaged_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    with pytest.raises(DataError, match=r"t\.parquet is not a readable Parquet file: .*footer"):
        load_table(write(tmp_path, "t.parquet", "junk"), "y")


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
    path = write(tmp_path, "t.parquet", "not read")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # how Python reports a package that is not installed
    with pytest.raises(DataError, match=r"t\.parquet \(Parquet\) needs pyarrow: pip install pyarrow"):
        load_table(path, "y")


# --------------------------------------------------------------------------------------------------------------
# bad tables: one line naming the file, the column and the line

GOOD = small_table(20)
MOSTLY_NUMBERS = "x,y\n" + "".join(f"{i},{'ab'[i % 2]}\n" for i in range(30)).replace("\n7,", "\n 7 kg,")
BAD = [
    ("empty", "", {}, "t.csv is empty"),
    ("header only", "x,y\n", {}, "t.csv has no data rows"),
    ("unknown target", GOOD, {"target": "why"}, "unknown target column 'why'.*known: colour, x, y"),
    ("close target", GOOD, {"target": "colours"}, r"unknown target column 'colours' \(did you mean 'colour'\?\)"),
    ("one class", "x,y\n1,a\n2,a\n3,a\n", {}, r"the target 'y' has one class \('a'\)"),
    ("empty column", "x,e,y\n1,,a\n2, ?,b\n3,,a\n", {}, "column 'e' is empty"),
    ("bad number", MOSTLY_NUMBERS, {}, r"column 'x', line 9 \(the header is line 1\): ' 7 kg' is not a number"),
    ("declared numeric", GOOD.replace("\n5,", "\nfive,"), {"categorical": ["colour"]},
     r"column 'x', line 7 \(the header is line 1\): 'five' is not a number"),
    ("blank line counted", "x,y\n1,a\n\n2,b\nthree,a\n", {"categorical": []}, "line 5 .*'three'"),
    ("missing target", "x,y\n1,a\n2,\n3,b\n", {}, r"the target 'y' is missing at line 3"),
    ("unknown feature", GOOD, {"features": ["xx"]}, r"unknown column in features 'xx' \(did you mean 'x'\?\)"),
    ("unknown categorical", GOOD, {"categorical": ["color"]}, "unknown column in categorical 'color'"),
    ("unknown id column", GOOD, {"id_columns": ["idx"]}, "unknown column in id_columns 'idx'"),
    ("target as feature", GOOD, {"features": ["x", "y"]}, "the target 'y' is listed in features"),
    ("categorical not input", GOOD, {"features": ["x"], "categorical": ["colour"]}, "not an input"),
    ("feature and id", GOOD, {"features": ["x"], "id_columns": ["x"]}, "both in features and in id_columns"),
    ("extra field", "x,y\n1,a,3\n2,b\n", {}, "a row has more fields than the header"),
    ("test lacks column", GOOD, {"test": "x,y\n1,a\n"}, r"test\.csv has no column 'colour'"),
    ("unknown test label", GOOD, {"test": "x,colour,y\n1,red,a\n2,red,c\n"},
     r"test\.csv: the target 'y' at line 3 \(the header is line 1\) is 'c', a class the training table does not"),
    ("bad test number", GOOD, {"test": "x,colour,y\n1,red,a\n?,red,b\nx1,red,a\n"}, r"test\.csv: column 'x', line 4"),
]


@pytest.mark.parametrize("text, kwargs, match", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_tables(tmp_path, text, kwargs, match):
    path = write(tmp_path, "t.csv", text)
    kwargs = dict(kwargs)
    target = kwargs.pop("target", "y")
    if "test" in kwargs:
        kwargs["test_path"] = write(tmp_path, "test.csv", kwargs.pop("test"))
    with pytest.raises(DataError, match=match) as caught:
        load_table(path, target, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path) in message and caught.value.exit_code == 2


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"no table at .*nothere\.csv"):
        load_table(tmp_path / "nothere.csv", "y")


@pytest.mark.parametrize("kwargs, match", [
    ({"val_fraction": 1.5}, r"val_fraction must be in \(0, 1\); got 1.5"),
    ({"features": "x"}, "features must be a list of column names; got 'x'"),
])
def test_bad_options(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        load_table(write(tmp_path, "t.csv", GOOD), "y", **kwargs)


# --------------------------------------------------------------------------------------------------------------
# from the command line: `regsearch optimize --study tabular --set data.path=... --set data.target=...`


def regsearch_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    """The installed `regsearch` entry point, as a user runs it."""
    exe = os.path.join(os.path.dirname(sys.executable), "regsearch")
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=cwd, timeout=900, check=False)


def best_test_accuracy(stdout: str) -> float:
    line = next(line for line in stdout.splitlines() if line.startswith("best trial"))
    return float(re.search(r"test accuracy (\d\.\d+)", line).group(1))


def test_a_small_table_from_the_command_line_with_and_without_a_test_file(tmp_path, monkeypatch, mlflow_store):
    rng = np.random.default_rng(0)
    for name, rows in (("train.csv", 300), ("test.csv", 100)):
        x = rng.normal(size=rows)
        colour = rng.choice(["red", "blue"], size=rows)
        label = np.where(x + (colour == "red") > 0.5, "yes", "no")
        pd.DataFrame({"x": x, "colour": colour, "label": label}).to_csv(tmp_path / name, index=False)
    monkeypatch.chdir(tmp_path)
    shutil.copy(mlflow_store, tmp_path / "mlflow.db")  # its migrations take seconds
    tiny = ["--n-trials", "2", "--set", "training.epochs=3", "--set", "data.target=label", "--set", "data.path=train.csv"]
    result = CliRunner().invoke(cli, ["optimize", "--study", "tabular", *tiny, "--set", "data.test_path=test.csv"])
    assert result.exit_code == 0, result.output
    assert "study tabular: 2 complete" in result.stdout and "val_acc gap_acc train_acc" in result.stdout
    assert best_test_accuracy(result.stdout) > 0.7  # a learnable rule: well above the majority class
    assert "Best combination (trial " in result.stdout
    with sqlite3.connect(tmp_path / "mlflow.db") as db:  # the study's MLflow run says which table, as a full path
        logged = dict(db.execute("select key, value from params where key like 'data.%'").fetchall())
    assert logged == {"data.path": str(tmp_path / "train.csv"), "data.test_path": str(tmp_path / "test.csv"),
                      "data.target": "label"}
    # no test file: the study says what validation found instead of a test accuracy
    result = CliRunner().invoke(cli, ["optimize", "--study", "tabular", "--study-name", "no-test", *tiny])
    assert result.exit_code == 0, result.output
    assert "study no-test: 2 complete" in result.stdout and "best trial" not in result.stdout
    assert re.search(r"Best combination \(trial \d\): .* - validation accuracy 0\.\d+", result.stdout)


def test_a_budget_in_steps_trains_a_small_table_more_epochs(tmp_path):
    import regsearch
    from regsearch._study_file import load_study

    rng = np.random.default_rng(0)
    epochs = {}
    for rows in (300, 1200):  # training splits of 240 and 960 rows: 4 and 15 steps of 64 rows an epoch
        x = rng.normal(size=rows)
        pd.DataFrame({"x": x, "label": np.where(x > 0, "yes", "no")}).to_csv(tmp_path / f"{rows}.csv", index=False)
        spec = load_study("tabular", [("data.path", str(tmp_path / f"{rows}.csv")), ("data.target", "label"),
                                      ("training.steps", 30), ("training.batch_size", 64), ("search.baseline", False)])
        study = regsearch.optimize(spec, n_trials=1, storage=str(tmp_path / f"{rows}.journal"), tracking=False)
        epochs[rows] = study.trials[0].user_attrs["epochs"]
    assert epochs == {300: 8, 1200: 2}  # the fewest epochs that hold 30 steps: ceil(30 / 4), ceil(30 / 15)


@pytest.mark.slow
def test_adult_from_the_command_line_end_to_end(tmp_path):
    train, test = shared_table("adult-train.csv"), shared_table("adult-test.csv")
    done = regsearch_cli("optimize", "--study", "tabular", "--n-trials", "3", "--set", "training.epochs=3",
                         "--set", "data.train_size=5000", "--set", f"data.path={train}", "--set", f"data.test_path={test}",
                         "--set", "data.target=income", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "study tabular: 3 complete" in done.stdout and "val_acc gap_acc train_acc" in done.stdout
    assert re.search(r"Best combination \(trial \d\): .* - test accuracy 0\.\d+", done.stdout)
    # 76 % of the test file is <=50K: a trained model is well above that; scikit-learn's defaults reach 0.87
    assert best_test_accuracy(done.stdout) > 0.8
