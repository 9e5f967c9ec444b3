"""plugins/regsearch-extras: installed with pip like a third-party package, each plugin's effect, a study using them."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import types

import optuna
import pytest
import torch
from torch import nn

from regsearch import LoopState, RegularizerRegistry, TensorData
from regsearch._regularizer import Applied
from regsearch._spec import TrainingSpec
from regsearch._trainer import fit
from regsearch.testing import check_regularizer

from .conftest import REPO

EXTRAS = REPO / "plugins" / "regsearch-extras"
NAMES = ["cutmix", "cutout", "gaussian_noise", "label_smoothing", "max_norm", "mixup", "swa"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """`pip install ./plugins/regsearch-extras` into a folder this module puts on sys.path (the interpreter's own
    site-packages stay untouched, so other tests see only regsearch's entry points)."""
    source = tmp_path_factory.mktemp("extras-source") / "regsearch-extras"
    shutil.copytree(EXTRAS, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path_factory.mktemp("extras-site")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(source)]
    if importlib.util.find_spec("setuptools") is not None:
        command.insert(-1, "--no-build-isolation")  # offline and fast; with build isolation pip fetches setuptools
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    yield target
    sys.path.remove(str(target))
    for name in [m for m in sys.modules if m == "regsearch_extras" or m.startswith("regsearch_extras.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def extras(site) -> types.ModuleType:
    return importlib.import_module("regsearch_extras")


@pytest.fixture(scope="module")
def registry(site) -> RegularizerRegistry:
    registry = RegularizerRegistry()
    registry.load_entry_points()
    return registry


def test_the_installed_package_registers_every_plugin_through_the_entry_point_group(registry):
    for name in NAMES:
        info = registry.get(name)
        assert info.source.replace("_", "-") == "package regsearch-extras 0.1.0"
        assert info.description and "\n" not in info.description


@pytest.mark.parametrize("name, options", [(n, {}) for n in NAMES] + [
    ("gaussian_noise", {"input_std": 0, "weight_std": [0.01, 0.2]}),
    ("early_stopping", {"patience": 1, "restore_best": True, "monitor": "val_loss"}),
])
def test_every_plugin_passes_the_contract_kit(registry, name, options):
    check_regularizer(registry.get(name).cls, **options)


@pytest.mark.parametrize("name, options, message", [
    ("mixup", {"alpha": [0, 1]}, r"regularizers\.mixup\.alpha: a log-scale range must be above 0"),
    ("cutout", {"size": 1.5}, r"regularizers\.cutout\.size: must be in \[0\.0, 1\.0\]"),
    ("label_smoothing", {"smoothing": 1}, r"regularizers\.label_smoothing\.smoothing: must be in \[0\.0, 1\.0\)"),
    ("early_stopping", {"monitor": "gap_acc"},
     r"regularizers\.early_stopping\.monitor: unknown value 'gap_acc' \(did you mean 'val_acc'\?\); known: val_acc"),
    ("early_stopping", {"restore_best": "yes"},
     r"regularizers\.early_stopping\.restore_best: expected true or false; got 'yes'"),
    ("early_stopping", {"min_delta": -0.1}, r"regularizers\.early_stopping\.min_delta: must be >= 0\.0; got -0\.1"),
    ("early_stopping", {"patience": 2.5}, r"regularizers\.early_stopping\.patience: expected whole numbers"),
    ("gaussian_noise", {"input_std": 0}, r"regularizers\.gaussian_noise: input_std and weight_std are both 0"),
    ("swa", {"strat": 0.5}, r"regularizers\.swa\.strat: unknown option \(did you mean 'start'\?\)"),
])
def test_bad_options_are_refused_naming_the_key(registry, name, options, message):
    from regsearch import ConfigError

    with pytest.raises(ConfigError, match=message):
        registry.create(name, options)


# --- each plugin's effect --------------------------------------------------------------------------------------

def started(reg, num_classes=3):
    model = nn.Linear(4, num_classes)
    reg.on_train_start(LoopState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 num_classes=num_classes), {})
    return reg


def one_hot(y, classes=3):
    return torch.nn.functional.one_hot(y, classes).float()


def test_label_smoothing_moves_eps_of_the_mass_to_a_uniform_spread(extras):
    reg = started(extras.LabelSmoothing(), num_classes=4)
    y = torch.tensor([0, 3, 1])
    _, soft = reg.transform_batch(torch.zeros(3, 2), y, {"smoothing": 0.2})
    assert torch.allclose(soft, one_hot(y, 4) * 0.8 + 0.05)
    # soft targets from an earlier plugin are smoothed the same way
    _, again = reg.transform_batch(torch.zeros(3, 2), soft, {"smoothing": 0.2})
    assert torch.allclose(again, soft * 0.8 + 0.05)


def test_mixup_mixes_inputs_and_targets_with_the_same_convex_weight(extras):
    torch.manual_seed(0)
    reg = started(extras.Mixup())
    n = 8
    x = torch.eye(n)  # row i of the mix holds lam at column i and 1 - lam at its partner's column
    y = torch.arange(n) % 3
    for _ in range(5):
        mixed, targets = reg.transform_batch(x, y, {"alpha": 0.4})
        weights = set()
        for i in range(n):
            partners = [k for k in range(n) if k != i and mixed[i, k] != 0]
            j = partners[0] if partners else i
            lam = mixed[i, i]
            assert mixed[i].sum().item() == pytest.approx(1.0) and len(partners) <= 1
            assert torch.allclose(targets[i], lam * one_hot(y[i:i + 1])[0] + (1 - lam) * one_hot(y[j:j + 1])[0],
                                  atol=1e-6)
            if partners:
                weights.add(round(lam.item(), 6))
        assert len(weights) <= 1  # one weight for the whole batch
        assert torch.allclose(targets.sum(1), torch.ones(n)) and (targets >= 0).all()


def test_mixup_alpha_controls_how_far_examples_are_mixed(extras):
    torch.manual_seed(0)
    reg = started(extras.Mixup())
    x, y = torch.eye(16), torch.arange(16) % 3

    def weight(alpha):
        mixed = reg.transform_batch(x, y, {"alpha": alpha})[0]
        paired = mixed.diagonal() < 1  # rows mixed with another row (not with themselves)
        if not paired.any():
            return 1.0  # lam was 1: nothing mixed
        lam = mixed.diagonal()[paired][0].item()
        return max(lam, 1 - lam)

    def extreme_share(alpha):
        return sum(weight(alpha) > 0.9 for _ in range(300)) / 300

    assert extreme_share(0.1) > 0.5 > extreme_share(4.0)  # small alpha: mostly near-pure examples


def test_cutout_zeroes_exactly_one_square_per_image_across_channels(extras):
    torch.manual_seed(0)
    x = torch.ones(32, 3, 10, 12)
    out, y = extras.Cutout().transform_batch(x, torch.zeros(32, dtype=torch.long), {"size": 0.4})
    corners = set()
    for image in out:
        assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
        rows, cols = torch.nonzero(image[0] == 0, as_tuple=True)
        assert len(rows) == 16  # side = round(0.4 * 10) = 4
        top, left = rows.min().item(), cols.min().item()
        assert rows.max() - top == 3 and cols.max() - left == 3
        corners.add((top, left))
    assert len(corners) > 10  # a different place for each image
    assert (out == 1).sum() == 32 * 3 * (120 - 16)


def test_cutmix_pastes_one_box_of_the_partner_per_image_and_mixes_targets_by_its_area(extras):
    torch.manual_seed(0)
    reg = started(extras.CutMix(), num_classes=16)
    n = 16
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 10, 12).contiguous()  # image i is all i
    y = torch.arange(n)
    out, targets = reg.transform_batch(x, y, {"alpha": 1.0})
    areas = set()
    for i in range(n):
        others = out[i][out[i] != i]
        partner = int(others[0]) if len(others) else i
        assert torch.all((out[i] == i) | (out[i] == partner))
        rows, cols = torch.nonzero(out[i, 0] == partner, as_tuple=True)
        if partner != i and len(rows):  # one rectangle, the same in every channel
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert len(rows) == box and torch.equal(out[i, 0], out[i, 2])
            areas.add(len(rows))
            assert targets[i, partner].item() == pytest.approx(len(rows) / 120)
            assert targets[i, i].item() == pytest.approx(1 - len(rows) / 120)
    assert len(areas) > 3  # each image its own box
    assert torch.allclose(targets.sum(1), torch.ones(n)) and (targets >= 0).all()


def test_cutout_refuses_flat_data_before_training(extras):
    from regsearch import ConfigError
    from regsearch._regularizer import TrialContext

    reg = extras.Cutout()
    model = nn.Linear(64, 10)
    reg.context = TrialContext(torch.zeros(4, 64), CPU, 0, 0, model, [])
    with pytest.raises(ConfigError, match=r"cutout needs image inputs \(N, C, H, W\)"):
        reg.transform_model(model, {"size": 0.5})


@pytest.fixture(scope="module")
def data() -> TensorData:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.8).long()
    return TensorData.from_arrays(x, y, val_fraction=0.25, num_classes=3)


def net(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(8, 32), *([nn.BatchNorm1d(32)] if bn else []), nn.ReLU(), nn.Linear(32, 3)]
    return nn.Sequential(*layers)


def test_max_norm_bounds_every_units_weight_norm_during_training(extras, data):
    model = net()
    reg = extras.MaxNorm()
    fit(model, data, [Applied(reg, {"max_norm": 0.6})], TrainingSpec(epochs=3, batch_size=32), lr=0.5, device=CPU,
        seed=0)
    for layer in (model[0], model[2]):
        norms = layer.weight.norm(dim=1)
        assert (norms <= 0.6 + 1e-5).all() and (norms > 0.6 - 1e-3).any()  # bound reached, never exceeded
    conv = nn.Conv2d(2, 4, 3)
    with torch.no_grad():
        conv.weight.mul_(100)
        conv.weight[0].fill_(0.01)
    small = conv.weight[0].clone()
    reg.constrain(conv, 1.0)
    assert torch.allclose(conv.weight.flatten(1).norm(dim=1)[1:], torch.ones(3))
    assert torch.equal(conv.weight[0], small)  # filters inside the bound are left alone


def recorder(regsearch_base):
    class Record(regsearch_base):
        """Records each epoch's weights and reported validation accuracy."""

        def search_space(self, trial):
            return {}

        def on_train_start(self, state, params):
            self.weights, self.val = [], []

        def on_epoch_end(self, state, params):
            self.weights.append(copy.deepcopy(state.model.state_dict()))
            self.val.append(state.metrics["val_acc"])

    return Record()


def test_early_stopping_stops_when_val_acc_stalls_for_patience_epochs(data):
    import regsearch
    from regsearch.regularizers.early_stopping import EarlyStopping  # built in now; the extras re-export it

    record = recorder(regsearch.Regularizer)
    reg = EarlyStopping()
    training = TrainingSpec(epochs=20, batch_size=32, schedule="constant")
    fit(net(), data, [Applied(record, {}), Applied(reg, {"patience": 2})], training, lr=0.0, device=CPU, seed=0)
    assert len(record.val) == 3  # lr 0: epoch 1 sets the best, epochs 2 and 3 do not beat it


def test_early_stopping_can_restore_the_best_epochs_weights(data):
    import regsearch
    from regsearch.regularizers.early_stopping import EarlyStopping

    record = recorder(regsearch.Regularizer)
    reg = EarlyStopping(restore_best=True)
    model = net()
    training = TrainingSpec(epochs=12, batch_size=16, schedule="constant")
    metrics = fit(model, data, [Applied(record, {}), Applied(reg, {"patience": 3})], training, lr=2.0, device=CPU,
                  seed=0)
    best = max(range(len(record.val)), key=lambda i: (record.val[i], -i))
    assert metrics["val_acc"] == max(record.val)
    for mine, kept in zip(model.state_dict().values(), record.weights[best].values()):
        assert torch.equal(mine, kept)


def test_swa_returns_the_average_of_the_last_epochs_with_batchnorm_statistics_recomputed(extras, data):
    import regsearch

    record = recorder(regsearch.Regularizer)
    model = net(bn=True)
    fit(model, data, [Applied(record, {}), Applied(extras.SWA(), {"start": 0.5})],
                  TrainingSpec(epochs=4, batch_size=32), lr=0.1, device=CPU, seed=0)
    assert extras.SWA.first_epoch(0.5, 4) == 3
    averaged = {k: (record.weights[2][k] + record.weights[3][k]) / 2 for k, _ in model.named_parameters()}
    for k, p in model.named_parameters():
        assert torch.allclose(p, averaged[k], atol=1e-6), k
    with torch.no_grad():
        hidden = model[0](data.x_train)
    assert torch.allclose(model[1].running_mean, hidden.mean(0), atol=1e-4)
    assert torch.allclose(model[1].running_var, hidden.var(0), rtol=1e-3)


def test_gaussian_input_noise_has_the_asked_standard_deviation(extras):
    torch.manual_seed(0)
    x = torch.zeros(1000, 20)
    noisy, _ = extras.GaussianNoise().transform_batch(x, torch.zeros(1000), {"input_std": 0.2, "weight_std": 0.0})
    assert noisy.std().item() == pytest.approx(0.2, rel=0.02)
    assert torch.equal(x, torch.zeros(1000, 20))


def test_gaussian_weight_noise_is_seen_by_training_passes_only_and_never_stays(extras, data):
    model = net()
    clean = copy.deepcopy(model.state_dict())
    seen = []
    model[0].register_forward_pre_hook(lambda m, args: seen.append((m.training, m.weight.detach().clone())))
    reg = extras.GaussianNoise(input_std=0, weight_std=0.1)
    training = TrainingSpec(epochs=2, batch_size=64, schedule="constant")
    fit(model, data, [Applied(reg, {"input_std": 0.0, "weight_std": 0.1})], training, lr=0.0, device=CPU, seed=0)
    rms = clean["0.weight"].pow(2).mean().sqrt()
    train_passes = [w for training_mode, w in seen if training_mode]
    eval_passes = [w for training_mode, w in seen if not training_mode]
    for w in train_passes:
        assert ((w - clean["0.weight"]).pow(2).mean().sqrt() / rms).item() == pytest.approx(0.1, rel=0.3)
    assert all(torch.allclose(w, clean["0.weight"], atol=1e-6) for w in eval_passes)
    for k, v in model.state_dict().items():  # lr 0: the noise went out before every step
        assert torch.allclose(v, clean[k], atol=1e-6)
    assert len(model._forward_pre_hooks) == 0 and not reg.handles  # the plugin's hooks are gone


# --- a study through the command line ------------------------------------------------------------------------

def regsearch_cli(site, *args, cwd):
    exe = os.path.join(os.path.dirname(sys.executable), "regsearch")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_a_digits_study_uses_the_installed_plugins_from_the_command_line(site, tmp_path):
    sets = ["regularizers.mixup={enabled: true}", "regularizers.label_smoothing={enabled: true}",
            "regularizers.max_norm={enabled: true}", "regularizers.swa={enabled: true, start: 0.4}",
            "regularizers.early_stopping={patience: [1, 3]}",
            "regularizers.gaussian_noise={weight_std: [0.01, 0.1]}", "training.epochs=2"]
    args = ["optimize", "--study", "digits", "--n-trials", "2"] + [a for s in sets for a in ("--set", s)]
    done = regsearch_cli(site, *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "study digits: 2 complete" in done.stdout
    study = optuna.load_study(study_name="digits",
                              storage=optuna.storages.JournalStorage(
                                  optuna.storages.journal.JournalFileBackend(str(tmp_path / "regsearch.journal"))))
    regularized = [t for t in study.trials if not t.user_attrs.get("baseline")]
    assert len(regularized) == 1  # trial 0 is the study's unregularized baseline
    for trial in regularized:
        assert {"mixup.alpha", "label_smoothing.smoothing", "max_norm.max_norm"} <= set(trial.params)
        assert "early_stopping.enabled" in trial.params and "gaussian_noise.enabled" in trial.params
        assert trial.user_attrs["metrics"]["val_acc"] > 0
    # cutout on flat digits: refused before any training, naming the plugin
    refused = regsearch_cli(site, "optimize", "--study", "digits", "--set", "regularizers.cutout={}",
                            cwd=tmp_path / "..")
    assert refused.returncode == 2
    assert "regularizers.cutout: cutout needs image inputs (N, C, H, W)" in refused.stderr


# --------------------------------------------------------------------------------------------------------------
# the cocktail studies: every regularizer behind its switch, end to end


def _journal_study(folder, name: str) -> optuna.Study:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(folder / "regsearch.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def _switched_off_params_are_not_sampled(trial: optuna.trial.FrozenTrial) -> None:
    for key, value in trial.params.items():
        if key.endswith(".enabled") and value is False:
            name = key[:-len(".enabled")]
            assert not [k for k in trial.params if k.startswith(f"{name}.") and k != key], (trial.number, name)


@pytest.mark.slow
def test_the_tabular_cocktail_runs_on_digits(site, tmp_path):
    done = regsearch_cli(site, "optimize", "--study", "cocktail-tabular", "--n-trials", "5", "--set",
                         "training.epochs=4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    study = _journal_study(tmp_path, "cocktail-tabular")
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    assert len(trials) == 5
    baseline, recipe = study.trials[0], study.trials[1]
    assert baseline.user_attrs["baseline"] is True and set(baseline.params) == {"lr"}
    assert recipe.params["batchnorm.enabled"] is True and recipe.params["mixup.enabled"] is False
    switches = {"batchnorm", "dropout", "l1", "l2", "label_smoothing", "mixup", "max_norm", "early_stopping", "swa",
                "gaussian_noise"}
    for trial in trials[1:]:
        assert {k[:-len(".enabled")] for k in trial.params if k.endswith(".enabled")} == switches
        _switched_off_params_are_not_sampled(trial)
    # the run ends by saying what the best combination bought against the baseline
    assert "the unregularized baseline (trial 0): test accuracy " in done.stdout


@pytest.mark.slow
def test_the_image_cocktail_runs_on_the_cifar_sample(site, tmp_path, cifar_sample):
    sets = ["data.train_size=600", "training.epochs=2", "search.pruner.min_resource=1", "training.batch_size=64"]
    done = regsearch_cli(site, "optimize", "--study", "cocktail", "--data-dir", str(cifar_sample), "--n-trials", "4",
                         "--device", "cpu", *[a for s in sets for a in ("--set", s)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    study = _journal_study(tmp_path, "cocktail")
    finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    assert len(finished) == 4 and study.trials[0].user_attrs["baseline"] is True
    recipe = study.trials[1]
    assert recipe.params["augment.enabled"] is True and recipe.params["choice.mix"] == "none"
    for trial in finished[1:]:
        assert trial.params["choice.mix"] in ("none", "mixup", "cutout")
        assert ("mixup.alpha" in trial.params) == (trial.params["choice.mix"] == "mixup")
        assert ("cutout.size" in trial.params) == (trial.params["choice.mix"] == "cutout")
        _switched_off_params_are_not_sampled(trial)
    assert "Best combination (trial " in done.stdout


# --- on the built-in ResNets, at the sizes images come in ------------------------------------------------------

@pytest.fixture(scope="module")
def cifar_images(cifar_sample) -> TensorData:
    from regsearch.data._tensors import load_dataset

    return load_dataset("cifar10", val_fraction=0.25, seed=0, train_size=96, data_dir=cifar_sample)


@pytest.mark.parametrize("name", ["mixup", "cutout", "cutmix"])
@pytest.mark.parametrize("size", [32, 96])
def test_image_plugins_train_a_resnet_at_small_and_photo_sizes(registry, cifar_images, name, size):
    from regsearch._regularizer import NamespacedTrial
    from regsearch.models import resnet18

    data = cifar_images
    if size != 32:  # the real images, upscaled as a folder of photos would be resized
        def grow(x):
            return torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear").round().byte()
        data = TensorData.from_arrays(grow(data.x_train), data.y_train, grow(data.x_test[:32]), data.y_test[:32],
                                      val_fraction=0.25, num_classes=10)
    torch.manual_seed(0)
    model = resnet18(tuple(data.x_train.shape[1:]), 10, width=8)
    assert (model.conv1.kernel_size == (3, 3)) == (size == 32)  # auto: the small stem, then the ImageNet one
    reg = registry.create(name, {})
    example = data.x_train[:4].float()
    reg.context = regsearch_context(model, example)
    fixed = optuna.trial.FixedTrial({f"{name}.{k}": v for k, v in DEFAULTS[name].items()})
    params = dict(reg.search_space(NamespacedTrial(fixed, name)))
    model = reg.transform_model(model, params)
    metrics = fit(model, data, [Applied(reg, params)], TrainingSpec(epochs=1, batch_size=32, precision="float32"),
                  lr=0.05, device=CPU, seed=0)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    x = data.x_train[:8].float()
    reg.on_train_start(LoopState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 num_classes=10), params)
    out, y = reg.transform_batch(x, data.y_train[:8], params)
    assert out.shape == (8, 3, size, size) and not torch.equal(out, x)
    assert y.shape in ((8,), (8, 10))


DEFAULTS = {"mixup": {"alpha": 0.4}, "cutout": {"size": 0.4}, "cutmix": {"alpha": 1.0}}


def regsearch_context(model, example):
    from regsearch._regularizer import TrialContext
    from regsearch.surgery import trace

    return TrialContext(example, CPU, 0, 0, model, trace(model, example))
