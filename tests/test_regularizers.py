"""The four seed regularizers, on the built-in models and on a hand-written nn.Module."""

from __future__ import annotations

import optuna
import pytest
import torch
from torch import nn

from regsearch import ConfigError, default_registry
from regsearch._optim import build_optimizer
from regsearch._regularizer import Applied, NamespacedTrial, TrialContext
from regsearch._spec import TrainingSpec
from regsearch.regularizers.dropout import ElementDropout
from regsearch.surgery import Chain, trace

BUILTINS = ["l1", "l2", "dropout", "batchnorm", "augment", "drop_path", "early_stopping"]


class TwoTowers(nn.Module):
    """A user's own module: attribute names, a conv trunk and a functional flatten in forward()."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(8 * 4 * 4, 16)
        self.head_act = nn.GELU()
        self.out = nn.Linear(16, 5)

    def forward(self, x):
        x = self.pool(self.act(self.stem(x)))
        return self.out(self.head_act(self.head(x.flatten(1))))


def context_for(model: nn.Module, example: torch.Tensor) -> TrialContext:
    return TrialContext(example_input=example, device=torch.device("cpu"), trial_number=0, seed=0, model=model,
                        sites=trace(model, example))


def apply(name: str, model: nn.Module, example: torch.Tensor, params: dict | None = None, **options):
    """Instantiate a built-in with options, run its search space on a fixed trial, transform the model."""
    reg = default_registry().create(name, options)
    reg.context = context_for(model, example)
    if params is None:
        study = optuna.create_study(direction="maximize")
        params = reg.search_space(NamespacedTrial(study.ask(), name))
    model = reg.transform_model(model, params)
    return reg, model, params


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))


@pytest.mark.parametrize("name", BUILTINS)
def test_builtins_come_from_the_package_entry_points(name):
    info = default_registry().get(name)
    assert info.source == "built-in"
    assert info.description  # shown by `regsearch plugins`


# --- l1 ------------------------------------------------------------------------------------------------------

def test_l1_penalty_is_strength_times_abs_weights_of_linear_and_conv_only():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    reg = default_registry().create("l1", {})
    by_hand = 1e-3 * (model[0].weight.abs().sum() + model[3].weight.abs().sum())
    got = reg.penalty(model, {"strength": 1e-3})
    assert torch.allclose(got, by_hand)
    # biases and BatchNorm parameters stay out of it
    with torch.no_grad():
        model[0].bias.fill_(100.0)
        model[1].weight.fill_(100.0)
        model[3].bias.fill_(100.0)
    assert torch.allclose(reg.penalty(model, {"strength": 1e-3}), by_hand)


def test_l1_searches_strength_on_a_log_scale():
    study = optuna.create_study()
    trial = study.ask()
    reg = default_registry().create("l1", {"strength": [1e-6, 1e-2]})
    reg.search_space(NamespacedTrial(trial, "l1"))
    dist = trial.distributions["l1.strength"]
    assert dist.log and (dist.low, dist.high) == (1e-6, 1e-2)


def test_l1_rejects_a_log_range_containing_zero():
    with pytest.raises(ConfigError, match=r"regularizers\.l1\.strength: .*log"):
        default_registry().create("l1", {"strength": [0, 1e-3]})


# --- l2 ------------------------------------------------------------------------------------------------------

def _groups(optimizer):
    return [(g["weight_decay"], sorted(tuple(p.shape) for p in g["params"])) for g in optimizer.param_groups]


@pytest.mark.parametrize("optimizer, cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_l2_is_weight_decay_on_weights_not_biases_or_norms(optimizer, cls):
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    reg = default_registry().create("l2", {})
    opt = build_optimizer(model, [Applied(reg, {"weight_decay": 0.01})], TrainingSpec(optimizer=optimizer), 0.1)
    assert type(opt) is cls
    groups = dict((wd, shapes) for wd, shapes in _groups(opt))
    assert groups[0.01] == [(2, 8), (8, 4)]
    assert groups[0.0] == [(2,), (8,), (8,), (8,)]  # biases and BatchNorm weight/bias


def test_without_l2_no_parameter_decays_even_with_adamw():
    model = nn.Linear(4, 2)
    opt = build_optimizer(model, [], TrainingSpec(optimizer="adamw"), 0.1)
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)


def test_l2_can_decay_every_parameter():
    model = nn.Linear(4, 2)
    reg = default_registry().create("l2", {"exclude_1d": False})
    opt = build_optimizer(model, [Applied(reg, {"weight_decay": 0.5})], TrainingSpec(), 0.1)
    assert _groups(opt) == [(0.5, [(2,), (2, 4)])]


# --- dropout -------------------------------------------------------------------------------------------------

def test_dropout_goes_after_activations_with_rank_matched_kind():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 8),
                          nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(2, 3, 8, 8)
    _, model, _ = apply("dropout", model, x, params={"rates": {"1": 0.3, "4": 0.2}})
    assert isinstance(model[1], Chain) and isinstance(model[1][1], nn.Dropout2d) and model[1][1].p == 0.3
    assert isinstance(model[4], Chain) and type(model[4][1]) is ElementDropout and model[4][1].p == 0.2
    assert model(x).shape == (2, 2)


@pytest.mark.parametrize("p", [0.01, 0.3, 0.5, 0.9])
def test_element_dropout_drops_at_its_rate_independently_and_keeps_the_expectation(p):
    torch.manual_seed(0)
    drop = ElementDropout(p).train()
    out = drop(torch.ones(1000, 1000))
    kept = out != 0
    assert kept.float().mean().item() == pytest.approx(1 - p, abs=0.003)
    assert out.mean().item() == pytest.approx(1.0, abs=0.01)  # kept elements scaled by 1/(1-p)
    assert torch.unique(out[kept]).numel() == 1  # one scale for all
    # neighbours (which share a 64-bit draw) are as independent as any two elements
    pairs = torch.stack([kept[:, :-1].flatten(), kept[:, 1:].flatten()]).float()
    assert abs(torch.corrcoef(pairs)[0, 1].item()) < 0.01
    assert torch.equal(drop.eval()(out), out)


def test_element_dropout_draws_its_own_mask_on_cpu_and_is_torch_dropout_elsewhere(monkeypatch):
    def not_here(*args, **kwargs):
        raise AssertionError("torch's dropout was called")

    drop = ElementDropout(0.3).train()
    x = torch.ones(32, 16)
    with monkeypatch.context() as m:
        m.setattr(torch.nn.functional, "dropout", not_here)
        out = drop(x)  # the fast mask: torch's dropout is not called
    assert 0 < (out == 0).sum() < x.numel()
    with monkeypatch.context() as m:
        m.setattr(torch.nn.functional, "dropout", not_here)
        with pytest.raises(AssertionError, match="torch's dropout was called"):
            ElementDropout(0.3, inplace=True).train()(x.clone())  # in place: torch's own


def test_element_dropout_gradient_flows_through_the_kept_elements_only():
    x = torch.randn(64, 33, requires_grad=True)
    out = ElementDropout(0.4).train()(x)
    out.sum().backward()
    kept = out.detach() != 0
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.6), atol=1e-4)
    assert torch.all(x.grad[~kept] == 0)


def test_dropout_is_active_in_train_and_off_in_eval():
    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(64, 6)
    reference = model(x).detach()
    _, model, _ = apply("dropout", model, x, params={"rates": {"1": 0.5, "3": 0.5}})
    model.eval()
    assert torch.equal(model(x), reference)
    model.train()
    assert not torch.allclose(model(x), reference)


def test_dropout_per_site_suggests_a_switch_and_rate_per_site():
    reg, _, params = apply("dropout", mlp(), torch.randn(2, 6), per_site=True)
    assert set(reg.context.sites[i].name for i in (1, 3)) == {"1", "3"}
    study = optuna.create_study()
    trial = study.ask()
    reg.search_space(NamespacedTrial(trial, "dropout"))
    names = set(trial.distributions)
    assert {"dropout.1.on", "dropout.3.on"} <= names
    for site in ("1", "3"):
        assert (f"dropout.{site}.p" in names) == trial.params[f"dropout.{site}.on"]


def test_dropout_never_sits_directly_before_a_batchnorm_and_never_after_the_output():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2),
                          nn.ReLU())
    reg, _, _ = apply("dropout", model, torch.randn(2, 6), params={"rates": {}})
    assert [s.name for s in reg.candidate_sites()] == ["4"]


def test_dropout_sites_by_name_pattern_on_a_user_module():
    model = TwoTowers()
    x = torch.randn(2, 3, 8, 8)
    reg, model, params = apply("dropout", model, x, types=[], sites=["head*", "stem"])
    assert set(params["rates"]) == {"stem", "head", "head_act"}
    if params["rates"]["stem"] > 0:
        assert isinstance(model.stem[1], nn.Dropout2d)
    assert model(x).shape == (2, 5)


def test_dropout_pattern_that_matches_nothing_is_a_config_error():
    model = mlp()
    with pytest.raises(ConfigError, match="no dropout site matches classifier"):
        apply("dropout", model, torch.randn(2, 6), types=[], sites=["classifier.*"])


# --- batchnorm -----------------------------------------------------------------------------------------------

def test_batchnorm_dimension_follows_the_layer_and_skips_the_output_layer():
    model = TwoTowers()
    x = torch.randn(4, 3, 8, 8)
    reg, model, params = apply("batchnorm", model, x)
    assert params["sites"] == ["stem", "head"]
    assert isinstance(model.stem, Chain) and isinstance(model.stem[1], nn.BatchNorm2d)
    assert model.stem[1].num_features == 8
    assert isinstance(model.head[1], nn.BatchNorm1d) and model.head[1].num_features == 16
    assert isinstance(model.out, nn.Linear)
    # before the activation by default, and the layer's bias is dropped (BatchNorm re-centres right after)
    assert model.stem[0].bias is None and model.head[0].bias is None
    assert model(x).shape == (4, 5)


def test_batchnorm_after_activation_keeps_the_bias():
    model = mlp()
    reg, model, params = apply("batchnorm", model, torch.randn(4, 6), position="after_activation")
    assert isinstance(model[1], Chain) and isinstance(model[1][0], nn.ReLU)
    assert isinstance(model[1][1], nn.BatchNorm1d)
    assert model[0].bias is not None


def test_batchnorm_uses_running_statistics_in_eval():
    torch.manual_seed(0)
    model = mlp()
    _, model, _ = apply("batchnorm", model, torch.randn(4, 6), params={"sites": ["0"]})
    model.train()
    for _ in range(20):
        model(torch.randn(32, 6) * 3 + 5)
    model.eval()
    one = torch.randn(1, 6)
    batch = torch.cat([one, torch.randn(7, 6) * 100])
    # eval output of a row does not depend on the rest of the batch
    assert torch.allclose(model(one), model(batch)[:1], atol=1e-5)
    norm = model[0][1]
    assert norm.num_batches_tracked.item() == 20
    assert torch.all(norm.running_mean != 0)


def test_batchnorm_then_dropout_compose_in_order():
    model = mlp()
    x = torch.randn(4, 6)
    bn, model, bn_params = apply("batchnorm", model, x, params={"sites": ["0", "2"]})
    dropout = default_registry().create("dropout", {})
    dropout.context = context_for(mlp(), x)
    model = dropout.transform_model(model, {"rates": {"0": 0.1, "1": 0.2}})
    # Linear -> BatchNorm -> Dropout at site 0: the dropout comes after the norm, never right before it
    assert [type(m).__name__ for m in model[0]] == ["Linear", "BatchNorm1d", "ElementDropout"]
    assert [type(m).__name__ for m in model[1]] == ["ReLU", "ElementDropout"]
    assert model(x).shape == (4, 3)


# --- the seed regularizers on the built-in ResNets -------------------------------------------------------------

def small_resnet(depth=(2, 2), width=8) -> nn.Module:
    from regsearch.models import resnet18

    return resnet18((3, 16, 16), 10, width=width, depth=depth)


def test_dropout_on_a_resnet_goes_after_each_activation_and_before_the_classifier_by_name():
    x = torch.randn(4, 3, 16, 16)
    reg, _, _ = apply("dropout", small_resnet(), x, params={"rates": {}})
    sites = [s.name for s in reg.candidate_sites()]
    assert sites[:3] == ["relu", "layer1.0.relu1", "layer1.0.relu"]  # the stem's, then each block's two
    assert "fc" not in sites and not any("bn" in s or "conv" in s for s in sites)
    _, model, params = apply("dropout", small_resnet(), x, sites=["flatten"], types=[], p=0.4)
    assert list(params["rates"]) == ["flatten"]
    assert type(model.flatten[1]) is ElementDropout and model.flatten[1].p == 0.4  # (N, C) features into fc
    model.eval()
    assert torch.equal(model(x), model(x))


def test_batchnorm_on_a_resnet_finds_no_site_and_says_so():
    """Every convolution of a ResNet is already followed by a BatchNorm and the classifier is the output layer."""
    with pytest.raises(ConfigError, match=r"no batchnorm site matches Linear, Conv1d, Conv2d, Conv3d in this model: "
                                          r"each of its \d+ such layers is already followed by a BatchNorm \(set "
                                          r"regularizers.batchnorm.enabled=false\)"):
        apply("batchnorm", small_resnet(), torch.randn(2, 3, 16, 16))


def test_a_site_pattern_that_matches_nothing_lists_the_first_modules_and_counts_the_rest():
    """A ResNet has dozens of modules: the one-line error names the first 12 and says how many it left out."""
    with pytest.raises(ConfigError, match=r"modules: conv1 \(Conv2d\), bn1 \(BatchNorm2d\), relu \(ReLU\), .* and "
                                          r"\d+ more$") as raised:
        apply("dropout", small_resnet(), torch.randn(2, 3, 16, 16), types=[], sites=["encoder.*"])
    assert str(raised.value).count("(") == 12 + 1  # the 12 modules listed and the sentence's own aside


def test_l1_and_l2_on_a_resnet_reach_every_conv_and_the_classifier_but_no_norm_or_bias():
    model = small_resnet()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    l1 = default_registry().create("l1", {})
    want = 0.01 * (sum(c.weight.abs().sum() for c in convs) + model.fc.weight.abs().sum())
    assert torch.allclose(l1.penalty(model, {"strength": 0.01}), want)
    l2 = default_registry().create("l2", {})
    opt = build_optimizer(model, [Applied(l2, {"weight_decay": 1e-4})], TrainingSpec(), 0.1)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(c.weight) for c in convs} | {id(model.fc.weight)}


# --- drop_path -----------------------------------------------------------------------------------------------

def test_drop_path_sets_a_linear_rate_over_the_depth_of_the_blocks():
    model = small_resnet(depth=(2, 1, 1))
    _, model, params = apply("drop_path", model, torch.randn(2, 3, 16, 16), params={"rate": 0.2})
    rates = [m.drop_prob for name, m in model.named_modules() if name.endswith("drop_path")]
    assert rates == pytest.approx([0.05, 0.1, 0.15, 0.2])  # rate * (i + 1) / n


def test_drop_path_is_the_identity_in_eval_and_drops_whole_branches_per_example_in_train():
    from regsearch._resnet import DropPath

    drop = DropPath(0.25)
    x = torch.randn(4000, 3, 2, 2) + 5.0
    assert drop.eval()(x) is x
    torch.manual_seed(0)
    out = drop.train()(x)
    kept = (out != 0).flatten(1)
    assert torch.all(kept.all(1) | ~kept.any(1))  # each example's branch is kept or dropped whole
    dropped = (~kept.any(1)).float().mean().item()
    assert abs(dropped - 0.25) < 0.03
    assert torch.allclose(out[kept.all(1)], x[kept.all(1)] / 0.75)


def test_a_dropped_branch_leaves_the_block_its_shortcut():
    from regsearch._resnet import BasicBlock

    block = BasicBlock(4, 4).train()
    block.drop_path.drop_prob = 0.999999
    x = torch.randn(3, 4, 5, 5)
    torch.manual_seed(0)
    assert torch.equal(block(x), torch.relu(x))  # every branch dropped: relu(identity)
    block.eval()
    assert not torch.equal(block(x), torch.relu(x))


class TimmBlock(nn.Module):
    """A residual block as timm writes one: the branch ends in a DropPath module holding `drop_prob`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.drop_path = type("DropPath", (nn.Identity,), {"drop_prob": 0.0})()

    def forward(self, x):
        return x + self.drop_path(self.conv(x))


def test_drop_path_sets_the_drop_prob_of_any_models_drop_path_modules_and_refuses_a_model_without():
    model = nn.Sequential(TimmBlock(), TimmBlock(), TimmBlock(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    x = torch.randn(2, 4, 4, 4)
    _, model, _ = apply("drop_path", model, x, params={"rate": 0.3})
    assert [model[i].drop_path.drop_prob for i in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    with pytest.raises(ConfigError, match=r"^drop_path needs residual branches: the model \(Sequential\) has no "
                                          r"module with a drop_prob"):
        apply("drop_path", mlp(), torch.randn(2, 6), params={"rate": 0.3})


def test_drop_path_searches_its_rate_in_range():
    reg = default_registry().create("drop_path", {"rate": [0.1, 0.2]})
    reg.context = context_for(small_resnet(), torch.randn(2, 3, 16, 16))
    trial = optuna.create_study().ask()
    params = reg.search_space(NamespacedTrial(trial, "drop_path"))
    assert 0.1 <= params["rate"] <= 0.2 and list(trial.params) == ["drop_path.rate"]
    with pytest.raises(ConfigError, match=r"regularizers\.drop_path\.rate: must be in \[0\.0, 1\.0\); got 1\.0"):
        default_registry().create("drop_path", {"rate": 1.0})
