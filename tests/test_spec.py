"""Study files: validation with messages that name the key, the value and what was expected."""

from __future__ import annotations

import pytest

from regsearch import ConfigError, load_study, spec_from_dict
from regsearch._spec import Range, SearchSpec, TrainingSpec
from regsearch._study_file import apply_overrides, available_studies


def test_shipped_studies_are_found_by_name_and_valid():
    found = available_studies()
    assert {"digits", "cifar"} <= set(found)
    table = [("data.path", "t.csv"), ("data.target", "y")]  # a table study needs its file and its label column
    for name in found:
        spec = load_study(name, table if name == "tabular" else ())
        assert spec.name == name and spec.description
        assert {r.name for r in spec.regularizers} >= {"l2", "dropout", "batchnorm"}


def test_defaults_fill_what_a_file_leaves_out():
    spec = spec_from_dict({"regularizers": {"l1": None}}, name="s")
    assert spec.training.epochs == 30 and spec.search.n_trials == 20
    assert spec.regularizers[0].name == "l1" and spec.regularizers[0].enabled == "search"
    assert spec.training.lr == Range(0.01, 0.3, log=True)


def test_enabled_is_taken_out_of_the_plugin_options():
    spec = spec_from_dict({"regularizers": {"batchnorm": {"enabled": True, "position": "after_activation"}}},
                          name="s")
    reg = spec.regularizers[0]
    assert reg.enabled == "on" and dict(reg.options) == {"position": "after_activation"}


@pytest.mark.parametrize("raw, message", [
    ({"trainig": {}}, r"^trainig: unknown key \(did you mean 'training'\?\)"),
    ({"training": {"epochz": 3}}, r"^training\.epochz: unknown key \(did you mean 'epochs'\?\)"),
    ({"training": {"epochs": 0}}, r"^training\.epochs: must be >= 1; got 0"),
    ({"training": {"epochs": "many"}}, r"^training\.epochs: expected a whole number; got 'many'"),
    ({"training": {"epochs": 2.5}}, r"^training\.epochs: expected a whole number"),
    ({"training": {"optimizer": "adamm"}}, r"^training\.optimizer: unknown value 'adamm' \(did you mean 'adamw'\?\)"),
    ({"training": {"lr": [0.1, 0.01]}}, r"^training\.lr: low must not exceed high"),
    ({"training": {"lr": [0, 0.1]}}, r"^training\.lr: a log-scale range must be above 0"),
    ({"training": {"lr": [0.1, 0.2, 0.3]}}, r"^training\.lr: a range is \[low, high\]"),
    ({"training": {"augment": True}}, r"^training\.augment: augmentation is the regularizer 'augment' now; write "),
    ({"data": {"name": "mnist"}}, r"^data\.name: unknown value 'mnist'; known: cifar10, digits, images, table"),
    ({"data": {"val_fraction": 1.5}}, r"^data\.val_fraction: must be <= 0\.9"),
    ({"search": {"sampler": {"name": "cmaes"}}}, r"^search\.sampler\.name: unknown value 'cmaes'"),
    ({"search": {"pruner": {"name": "medain"}}}, r"^search\.pruner\.name: unknown value 'medain' \(did you mean 'median'\?\)"),
    ({"search": {"pruner": "median"}}, r"^search\.pruner: expected a mapping of keys"),
    ({"regularizers": ["l1", "l2"]}, r"^regularizers: expected a mapping of plugin name to its options"),
    ({"regularizers": {"l1": 3}}, r"^regularizers\.l1: expected a mapping of the plugin's options"),
    ({"regularizers": {"l1": {"enabled": "maybe"}}}, r"^regularizers\.l1\.enabled: expected search, true or false"),
    ({"regularizers": {"l1": {"enabled": [True]}}},
     r"^regularizers\.l1\.enabled: expected search, true or false; got \[True\]$"),
    ({1: 2}, r"^1: unknown key; known: data, description, model, plugins, regularizers, search, seed, training$"),
    ({"plugins": "my.py"}, r"^plugins: expected a list of plugin file paths"),
    ({"name": "x"}, r"^name: unknown key"),
    ({"model": "mlp"}, r"^model: expected a mapping with a 'name'"),
])
def test_bad_values_name_the_key_and_what_was_expected(raw, message):
    with pytest.raises(ConfigError, match=message):
        spec_from_dict(raw, name="s")


@pytest.mark.parametrize("text, message", [
    ("", r"the study file is empty"),
    ("- a\n- b\n", r"a study file is a mapping of keys; got a list"),
    ("training: {epochs: [1, 2\n", r"not valid YAML at line \d+"),
    ("!!python/object/apply:os.system ['echo owned']\n", r"not valid YAML"),
])
def test_unusable_files_are_reported_with_the_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_study(str(path))


def test_unknown_study_name_lists_the_known_ones_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown study 'digts' \(did you mean 'digits'\?\); known: .*cifar.*digits"):
        load_study("digts")


def test_overrides_set_dotted_keys_as_yaml_scalars():
    raw = apply_overrides({"training": {"epochs": 30}}, [("training.epochs", "5"), ("training.lr", "[0.1, 0.2]"),
                                                        ("search.pruner.name", "none"), ("search.baseline", "false")])
    spec = spec_from_dict(raw, name="s")
    assert spec.training.epochs == 5 and spec.training.lr == Range(0.1, 0.2, log=True)
    assert spec.search.pruner.name == "none" and spec.search.baseline is False


def test_a_budget_is_epochs_or_steps_and_a_set_one_replaces_the_files():
    with pytest.raises(ConfigError, match=r"^training: give epochs or steps, not both"):
        spec_from_dict({"training": {"epochs": 12, "steps": 1500}}, name="s")
    with pytest.raises(ConfigError, match=r"^training: give epochs or steps, not both"):
        spec_from_dict({"training": {"epochs": [4, 12], "steps": 1500}}, name="s")  # nor searched epochs
    # the shipped tabular study's budget is steps; --set training.epochs=3 (a quick try) replaces it, and back
    table = [("data.path", "t.csv"), ("data.target", "y")]
    assert load_study("tabular", table).training.steps == 1500
    quick = load_study("tabular", [*table, ("training.epochs", "3")]).training
    assert (quick.steps, quick.epochs) == (None, 3)
    assert load_study("digits", [("training.steps", "200")]).training.steps == 200


def test_an_override_into_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match=r"--set training\.epochs\.x: training\.epochs is not a mapping"):
        apply_overrides({"training": {"epochs": 30}}, [("training.epochs.x", "1")])


def test_an_override_with_an_unknown_key_gets_did_you_mean():
    with pytest.raises(ConfigError, match=r"training\.epoch: unknown key \(did you mean 'epochs'\?\)"):
        load_study("digits", [("training.epoch", "3")])


def test_plugin_paths_are_relative_to_the_study_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("plugins: [plugs/mine.py]\n")
    assert load_study(str(path)).plugins == (str(tmp_path / "plugs" / "mine.py"),)


def test_table_paths_are_relative_to_the_study_file_or_to_the_current_folder_for_set(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "s.yaml"
    path.write_text("data: {name: table, path: train.csv, test_path: ~/test.csv, target: 1}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data = load_study(str(path)).data
    assert (data.path, data.test_path) == (str(tmp_path / "sub" / "train.csv"), str(tmp_path / "home" / "test.csv"))
    assert data.target == "1"  # a header that YAML reads as a number is still the column's name
    data = load_study(str(path), [("data.path", "mine.csv"), ("data.features", "[a, 2]")]).data
    assert data.path == str(tmp_path / "mine.csv") and data.test_path == str(tmp_path / "home" / "test.csv")
    assert data.features == ("a", "2")
    assert load_study(str(path), [("data", "{name: table, path: b.csv, target: y}")]).data.path == str(tmp_path / "b.csv")


def test_a_spec_built_in_python_is_checked_like_a_file():
    with pytest.raises(ConfigError, match=r"^epochs: must be >= 1; got 0$"):
        TrainingSpec(epochs=0)
    with pytest.raises(ConfigError, match=r"^max_gap 0\.1 and objective pareto do not combine"):
        SearchSpec(objective="pareto").replace(max_gap=0.1)
    assert TrainingSpec(epochs=3).replace(label_smoothing=0.1).label_smoothing == 0.1
