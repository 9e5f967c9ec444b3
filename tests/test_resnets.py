"""The built-in ResNets in torchvision's layout, fine-tuning from a local weights file, and model factories by
import path."""

from __future__ import annotations

import sys
import textwrap

import optuna
import pytest
import torch
from safetensors.torch import save_file

import regsearch
from regsearch import ConfigError
from regsearch._experiment import prepare
from regsearch._regularizer import NamespacedTrial
from regsearch._spec import spec_from_dict
from regsearch._trainer import fit
from regsearch._trial import build_trial
from regsearch._weights import FrozenBackbone, load_weights, read_state_dict
from regsearch.data._tensors import load_dataset
from regsearch.models import MODELS, model_factory

CPU = torch.device("cpu")

# The published architectures (He et al. 2015; torchvision's resnet18/34/50): blocks per stage, convolutions per
# block, and the published parameter counts of the ImageNet models (1000 classes).
PUBLISHED = {
    "resnet18": ((2, 2, 2, 2), 2, 11_689_512),
    "resnet34": ((3, 4, 6, 3), 2, 21_797_672),
    "resnet50": ((3, 4, 6, 3), 3, 25_557_032),
}


def published_keys(name: str) -> list[str]:
    """The state-dict keys of torchvision's model, in its order, written out from the published layout."""
    stages, convs, _ = PUBLISHED[name]
    bottleneck = convs == 3

    def bn(prefix: str) -> list[str]:
        return [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]

    keys = ["conv1.weight", *bn("bn1")]
    for s, blocks in enumerate(stages):
        for b in range(blocks):
            p = f"layer{s + 1}.{b}"
            for c in range(1, convs + 1):
                keys += [f"{p}.conv{c}.weight", *bn(f"{p}.bn{c}")]
            if b == 0 and (s > 0 or bottleneck):  # a stride-2 stage, or ResNet-50's widening first block
                keys += [f"{p}.downsample.0.weight", *bn(f"{p}.downsample.1")]
    return keys + ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("name, tensors, parameters, state", [
    ("resnet18", 102, 62, 122), ("resnet34", 182, 110, 218), ("resnet50", 267, 161, 320)])
def test_the_state_dict_is_torchvisions_key_for_key(name, tensors, parameters, state):
    model = MODELS[name]((3, 224, 224), 1000, stem="imagenet")
    keys = list(model.state_dict())
    assert keys == published_keys(name)
    assert len(keys) == state
    assert len([k for k in keys if not k.endswith("num_batches_tracked")]) == tensors
    assert len(list(model.parameters())) == parameters
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name][2]
    assert model.state_dict()["conv1.weight"].shape == (64, 3, 7, 7)
    assert model.state_dict()["fc.weight"].shape == (1000, 2048 if name == "resnet50" else 512)


def test_the_stem_fits_the_image_size_and_any_size_goes_in():
    small = MODELS["resnet18"]((3, 32, 32), 10)  # auto: small up to 64 px
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)
    large = MODELS["resnet18"]((3, 96, 96), 10)
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, torch.nn.MaxPool2d)
    grey = MODELS["resnet50"]((1, 7, 13), 4, width=8, stem="imagenet").eval()
    with torch.no_grad():
        assert grey(torch.randn(2, 1, 7, 13)).shape == (2, 4)
        assert small.eval()(torch.randn(2, 3, 50, 21)).shape == (2, 10)


def test_bad_options_name_the_key():
    with pytest.raises(ConfigError, match=r"model: stem must be one of auto, small, imagenet; got 'tiny'"):
        model_factory("resnet18", {"stem": "tiny"}, (3, 32, 32), 10)
    with pytest.raises(ConfigError, match=r"model: resnet34 needs image inputs \(C, H, W\)"):
        model_factory("resnet34", {}, (64,), 10)
    with pytest.raises(ConfigError, match=r"unknown model 'resnet81' \(did you mean 'resnet18'\?\).*import path"):
        model_factory("resnet81", {}, (3, 32, 32), 10)


def test_width_and_depth_are_searched_like_any_model_key():
    spec = spec_from_dict({"model": {"name": "resnet18", "width": [8, 16], "depth": {"choices": [[1, 1], [2, 1, 1]]}}},
                          name="s")
    assert set(spec.searched) == {"model.width", "model.depth"}
    build = model_factory("resnet18", spec.model.options, (3, 32, 32), 10, spec.searched)
    model = build(NamespacedTrial(
        optuna.trial.FixedTrial({"model.width": 12, "model.depth": "[2, 1, 1]"}), "model"))
    assert model.conv1.out_channels == 12
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [2, 1, 1] and not hasattr(model, "layer4")
    assert model.fc.in_features == 48


# --- weights --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def imagenet18(tmp_path_factory):
    """A ResNet-18 checkpoint in torchvision's layout (1000 classes, ImageNet stem), as .pth and .safetensors."""
    torch.manual_seed(1)
    model = MODELS["resnet18"]((3, 224, 224), 1000, stem="imagenet")
    for m in model.modules():  # statistics and scales a trained network would have, not the initial ones
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    state = model.state_dict()
    folder = tmp_path_factory.mktemp("weights")
    torch.save(state, folder / "resnet18.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "resnet18.safetensors"))
    return folder, state


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_a_checkpoint_round_trips_strictly_and_fine_tuning_loads_exactly_its_weights(imagenet18, suffix):
    folder, state = imagenet18
    path = str(folder / f"resnet18.{suffix}")
    same = MODELS["resnet18"]((3, 224, 224), 1000, stem="imagenet")
    same.load_state_dict(read_state_dict(path), strict=True)
    assert all(torch.equal(v, state[k]) for k, v in same.state_dict().items())

    spec = spec_from_dict({"model": {"name": "resnet18", "stem": "imagenet", "weights": path}}, name="ft")
    build = regsearch._weights.pretrained(model_factory("resnet18", spec.model.options, (3, 32, 32), 10), path, False)
    tuned = build()
    for key, value in tuned.state_dict().items():
        if key.startswith("fc."):
            assert value.shape[0] == 10  # replaced for the data's classes
        else:
            assert torch.equal(value, state[key]), key
    assert tuned.fc.weight.shape == (10, 512)


def test_a_mismatch_names_the_first_mismatched_tensor_and_missing_keys(imagenet18):
    folder, _ = imagenet18
    path = str(folder / "resnet18.pth")
    tensors = read_state_dict(path)
    with pytest.raises(ConfigError, match=r"model\.weights: .*resnet18\.pth: conv1\.weight is \[64, 3, 7, 7\] in "
                                          r"the file but \[64, 3, 3, 3\] in the model \(is model\.stem right"):
        load_weights(MODELS["resnet18"]((3, 32, 32), 10, stem="small"), tensors, path)
    with pytest.raises(ConfigError, match=r"resnet18\.pth: conv1\.weight is \[64, 3, 7, 7\] in the file but "
                                          r"\[32, 3, 7, 7\] in the model$"):
        load_weights(MODELS["resnet18"]((3, 32, 32), 10, width=32, stem="imagenet"), tensors, path)
    with pytest.raises(ConfigError, match=r"does not fit the model \(ResNet\): 80 tensors missing from the file "
                                          r"\(layer1\.2\.conv1\.weight, layer1\.2\.bn1\.weight, .*, \.\.\. 77 more\)$"):
        load_weights(MODELS["resnet34"]((3, 32, 32), 10, stem="imagenet"), tensors, path)
    with pytest.raises(ConfigError, match=r": 12 tensors in the file but not in the model \(layer1\.1\.conv1\.weight"):
        load_weights(MODELS["resnet18"]((3, 32, 32), 10, depth=[1, 2, 2, 2], stem="imagenet"), tensors, path)


def test_a_file_that_is_no_state_dict_is_named(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ConfigError, match=r"list\.pth holds a list, not a state dict"):
        read_state_dict(str(tmp_path / "list.pth"))
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ConfigError, match=r"bad\.safetensors is not a readable safetensors file"):
        read_state_dict(str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConfigError, match=r"model\.weights: .*w\.h5: expected a \.safetensors, \.pth, \.pt, \.bin"):
        (tmp_path / "w.h5").write_bytes(b"x")
        read_state_dict(str(tmp_path / "w.h5"))


@pytest.fixture(scope="module")
def cifar(cifar_sample):
    return load_dataset("cifar10", val_fraction=0.2, seed=0, train_size=160, data_dir=cifar_sample)


def test_freeze_epochs_keeps_the_backbone_as_loaded_then_trains_it(cifar, tmp_path):
    torch.manual_seed(0)
    source = MODELS["resnet18"]((3, 32, 32), 10, width=8, depth=[1, 1])
    path = tmp_path / "small.pth"
    torch.save(source.state_dict(), path)
    spec = spec_from_dict({"model": {"name": "resnet18", "width": 8, "depth": [1, 1], "weights": str(path),
                                     "freeze_epochs": 2},
                           "training": {"epochs": 3, "batch_size": 32, "lr": 0.05, "precision": "float32"}},
                          name="freeze")
    exp = prepare(spec, data=cifar, device="cpu")
    model, applied, lr = build_trial(exp, optuna.trial.FixedTrial({}), seed=0, baseline=True)
    assert [type(a.regularizer) for a in applied] == [FrozenBackbone]
    seen = []
    fit(model, cifar, applied, exp.spec.training, lr=lr, device=CPU, seed=0,
        on_epoch=lambda epoch, metrics: seen.append({k: v.clone() for k, v in model.state_dict().items()}))
    loaded = source.state_dict()
    for epoch in (0, 1):
        for key, value in seen[epoch].items():
            if key.startswith("fc."):
                assert not torch.equal(value, seen[epoch - 1][key] if epoch else loaded[key]), key
            elif not key.endswith("num_batches_tracked"):
                assert torch.equal(value, loaded[key]), (epoch + 1, key)  # weights and BatchNorm statistics
    assert not torch.equal(seen[2]["layer1.0.conv1.weight"], loaded["layer1.0.conv1.weight"])
    assert not torch.equal(seen[2]["bn1.running_mean"], loaded["bn1.running_mean"])
    assert all(p.requires_grad for p in model.parameters())


def test_weights_load_into_a_python_model_factory_too(cifar, tmp_path):
    torch.manual_seed(3)
    source = MODELS["resnet18"]((3, 32, 32), 10, width=8, depth=[1])
    torch.save(source.state_dict(), tmp_path / "mine.pth")
    spec = spec_from_dict({"model": {"weights": str(tmp_path / "mine.pth")}, "training": {"epochs": 1}}, name="py")
    exp = prepare(spec, data=cifar, device="cpu",
                  model=lambda trial: MODELS["resnet18"]((3, 32, 32), 10, width=trial.suggest_int("width", 8, 8),
                                                         depth=[1]))
    built = build_trial(exp, optuna.trial.FixedTrial({"model.width": 8, "lr": 0.05}), seed=0, baseline=True)[0]
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in built.state_dict().items())


def test_freeze_epochs_needs_weights():
    with pytest.raises(ConfigError, match=r"model\.freeze_epochs: needs model\.weights"):
        spec_from_dict({"model": {"name": "resnet18", "freeze_epochs": 2}}, name="f")


# --- import paths ---------------------------------------------------------------------------------------------

FACTORY = """
    from torch import nn

    def make(num_classes, width=4, input_shape=None):
        '''A small CNN; takes input_shape, so regsearch passes it.'''
        return nn.Sequential(nn.Conv2d(input_shape[0], width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(width, num_classes))

    def headless(**options):
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(options["num_classes"]))
"""


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "tinynets.py").write_text(textwrap.dedent(FACTORY))
    (tmp_path / "needsdep.py").write_text("import a_library_that_is_not_installed_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    yield tmp_path
    for name in ("tinynets", "needsdep"):
        sys.modules.pop(name, None)


def test_an_import_path_builds_the_model_with_the_datas_classes(factories, cifar, tmp_path):
    build = model_factory("tinynets:make", {"width": 6}, (3, 32, 32), 10)
    model = build()
    assert model[0].out_channels == 6 and model[-1].out_features == 10 and model[0].in_channels == 3
    spec = spec_from_dict({"model": {"name": "tinynets:make", "width": {"low": 4, "high": 8}},
                           "training": {"epochs": 1, "batch_size": 64}, "search": {"n_trials": 2}}, name="imp")
    assert spec.searched["model.width"].integer  # an import path's key: whole numbers, as its bounds are written
    study = regsearch.optimize(spec, data=cifar, tracking=False, storage=str(tmp_path / "imp.journal"))
    widths = [t.params["model.width"] for t in study.trials]
    assert all(isinstance(w, int) for w in widths) and all(t.state.name == "COMPLETE" for t in study.trials)
    assert model_factory("tinynets:headless", {}, (3, 32, 32), 7)()[1].out_features == 7


@pytest.mark.parametrize("name, message", [
    ("no_such_package_here:make", r"model\.name: 'no_such_package_here:make' does not import: no module named "
                                  r"'no_such_package_here' is installed"),
    ("needsdep:make", r"model\.name: 'needsdep:make' does not import: module 'needsdep' needs "
                      r"'a_library_that_is_not_installed_here', which is not installed"),
    ("tinynets:nothing", r"model\.name: module 'tinynets' has no 'nothing'"),
    ("tinynets:", r"model\.name: an import path is 'package\.module:callable'; got 'tinynets:'"),
])
def test_an_import_path_that_does_not_import_says_what_is_missing(factories, name, message):
    with pytest.raises(ConfigError, match=message):
        model_factory(name, {}, (3, 32, 32), 10)


def test_num_classes_comes_from_the_data(factories):
    with pytest.raises(ConfigError, match=r"model\.num_classes: set from the data \(10 classes\); leave it out"):
        model_factory("tinynets:make", {"num_classes": 1000}, (3, 32, 32), 10)


def test_a_searched_study_of_resnet18_with_drop_path_runs(cifar, tmp_path):
    spec = spec_from_dict({"model": {"name": "resnet18", "width": 8},
                           "training": {"epochs": 1, "batch_size": 64, "precision": "float32"},
                           "search": {"n_trials": 3, "first_trial": {"drop_path.enabled": True}},
                           "regularizers": {"drop_path": {"rate": [0.05, 0.3]}}}, name="dp")
    study = regsearch.optimize(spec, data=cifar, tracking=False, storage=str(tmp_path / "dp.journal"))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3
    rates = [t.params["drop_path.rate"] for t in done if t.params.get("drop_path.enabled")]
    assert rates and all(0.05 <= r <= 0.3 for r in rates)
    assert all(0.0 <= t.user_attrs["metrics"]["val_acc"] <= 1.0 for t in done)


def test_a_regularizer_switched_off_for_good_is_not_checked_against_the_model(cifar, tmp_path):
    """The images study's BatchNorm insertion has no site in a ResNet (each conv has its BatchNorm already):
    `--set regularizers.batchnorm.enabled=false` switches it off instead of stopping the study."""
    from regsearch._errors import ConfigError

    regularizers = {"batchnorm": {"enabled": True}, "l2": {"weight_decay": 1e-4}}
    spec = {"model": {"name": "resnet18", "width": 4}, "training": {"epochs": 1, "precision": "float32"},
            "search": {"n_trials": 1, "baseline": False}, "regularizers": regularizers}
    with pytest.raises(ConfigError, match="regularizers.batchnorm: no batchnorm site"):
        regsearch.optimize(spec_from_dict(spec, name="on"), data=cifar, tracking=False,
                           storage=str(tmp_path / "on.journal"))
    regularizers["batchnorm"]["enabled"] = False
    study = regsearch.optimize(spec_from_dict(spec, name="off"), data=cifar, tracking=False,
                               storage=str(tmp_path / "off.journal"))
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE
