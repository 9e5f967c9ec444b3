"""The trainer: hooks for loop-event plugins (batch transforms with soft targets, early stop, a final model) and the
precision a trial trains in."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from regsearch import PluginError, Regularizer, TensorData, _device
from regsearch._device import autocast_dtype, step_flops
from regsearch._regularizer import Applied
from regsearch._spec import TrainingSpec
from regsearch._trainer import evaluate, fit
from regsearch.data._tensors import Batcher
from regsearch.models import MODELS, model_factory
from regsearch.regularizers.augment import Augment

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data() -> TensorData:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(160, 6, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return TensorData.from_arrays(x, y, val_fraction=0.25, num_classes=3)


@pytest.fixture(scope="module")
def images() -> TensorData:
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(1, 256, (40, 3, 6, 6), generator=gen, dtype=torch.uint8)
    return TensorData.from_arrays(x, torch.arange(40) % 2, val_fraction=0.25)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


class Recorder(Regularizer):
    """Records what the loop hands to its hooks."""

    def __init__(self, soft: bool = False, stop_at: int = 0) -> None:
        self.soft, self.stop_at = soft, stop_at
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.epochs: list[int] = []

    def search_space(self, trial):
        return {}

    def transform_batch(self, x, y, params):
        self.batches.append((x.clone(), y.clone()))
        if self.soft:
            y = torch.nn.functional.one_hot(y, 3).float()
        return x, y

    def on_epoch_end(self, state, params):
        self.epochs.append(state.epoch)
        state.stop = state.epoch == self.stop_at


def test_soft_targets_from_transform_batch_train_like_the_int_labels_they_encode(data):
    training = TrainingSpec(epochs=2, batch_size=32, label_smoothing=0.1)
    plain = fit(mlp(), data, [Applied(Recorder(), {})], training, lr=0.05, device=CPU, seed=3)
    soft = Recorder(soft=True)
    one_hot = fit(mlp(), data, [Applied(soft, {})], training, lr=0.05, device=CPU, seed=3)
    assert one_hot["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-4)
    assert one_hot["fit_loss"] == pytest.approx(plain["fit_loss"], rel=1e-4)
    # every training batch went through the hook, labels first as int64; evaluation never did
    assert len(soft.batches) == 2 * (len(data.y_train) // 32 + 1)
    assert all(y.dtype == torch.long and len(x) == len(y) for x, y in soft.batches)


def test_transform_batch_sees_augmented_normalised_images_and_eval_is_untouched(images):
    class Blank(Recorder):
        def transform_batch(self, x, y, params):
            super().transform_batch(x, y, params)
            return torch.zeros_like(x), y

    blank = Blank()
    training = TrainingSpec(epochs=1, batch_size=10)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 2))
    # listed after the recorder, the built-in augmentation still runs first (its batch_order is lower)
    applied = [Applied(blank, {}), Applied(Augment(translate=2), {"translate": 2})]
    metrics = fit(model, images, applied, training, lr=0.1, device=CPU, seed=0)
    x, _ = blank.batches[0]
    assert x.dtype == torch.float32 and x.shape == (10, 3, 6, 6)
    # normalised, and translated: no real pixel sits exactly at the mean, the shifted-in border does (0.0)
    assert not (Batcher(images).inputs(images.x_train) == 0).any()
    assert (x == 0).all(dim=1).any()
    # the model trained on blank inputs, yet evaluation fed it the real ones
    val = evaluate(model, Batcher(images), images.x_val, images.y_val, 1024)
    assert metrics["val_loss"] == pytest.approx(val[0])


def test_a_transform_batch_returning_garbage_fails_naming_the_plugin(data):
    class Broken(Recorder):
        def transform_batch(self, x, y, params):
            return x, y.float()

    broken = Broken()
    broken.name = "broken"
    with pytest.raises(PluginError, match=r"'broken': transform_batch must return int64 labels .*torch.float32"):
        fit(mlp(), data, [Applied(broken, {})], TrainingSpec(epochs=1), lr=0.05, device=CPU, seed=0)


def test_state_stop_ends_training_after_that_epoch_was_reported(data):
    stopper = Recorder(stop_at=2)
    reported = []
    fit(mlp(), data, [Applied(stopper, {})], TrainingSpec(epochs=6, batch_size=32), lr=0.05, device=CPU, seed=0,
        on_epoch=lambda epoch, m: reported.append(epoch))
    assert stopper.epochs == [1, 2] and reported == [1, 2]


class Swap(Regularizer):
    """Replaces the model at the end by a copy taken after the first epoch, BN statistics recomputed."""

    def search_space(self, trial):
        return {}

    def on_train_start(self, state, params):
        self.copy = None

    def on_epoch_end(self, state, params):
        if self.copy is None:
            self.copy = copy.deepcopy(state.model)

    def on_train_end(self, state, params):
        self.seen = list(state.batches())
        torch.optim.swa_utils.update_bn(self.seen, self.copy)
        state.model = self.copy


def test_a_model_swapped_at_train_end_is_evaluated_and_becomes_the_trials_model(data):
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    swap = Swap()
    reported = {}
    metrics = fit(model, data, [Applied(swap, {})], TrainingSpec(epochs=4, batch_size=32), lr=0.05, device=CPU,
                  seed=0, on_epoch=lambda epoch, m: reported.update({epoch: m}))
    # the caller's model now holds the swapped-in weights, and the returned metrics are that model's
    for mine, final in zip(model.state_dict().values(), swap.copy.state_dict().values()):
        assert torch.equal(mine, final)
    val_loss, val_acc = evaluate(model, Batcher(data), data.x_val, data.y_val, 1024)
    assert metrics["val_loss"] == pytest.approx(val_loss) and metrics["val_acc"] == pytest.approx(val_acc)
    assert metrics["val_loss"] != pytest.approx(reported[4]["val_loss"])
    assert metrics["gap_loss"] == pytest.approx(metrics["val_loss"] - metrics["train_loss"])
    # batches(): every training input once, as the model sees them in eval
    assert torch.equal(torch.cat(swap.seen), data.x_train)
    bn = model[1]
    assert torch.allclose(bn.running_mean, model[0](data.x_train).mean(0), atol=1e-4)


def test_a_swapped_model_of_another_structure_is_a_plugin_error(data):
    class Shrink(Swap):
        def on_train_end(self, state, params):
            state.model = nn.Linear(6, 3)

    shrink = Shrink()
    shrink.name = "shrink"
    with pytest.raises(PluginError, match=r"on_train_end of 'shrink' left a model whose weights do not fit"):
        fit(mlp(), data, [Applied(shrink, {})], TrainingSpec(epochs=1), lr=0.05, device=CPU, seed=0)


def test_a_one_cycle_schedule_of_four_steps_in_all_trains(data):
    # 120 training rows in 2 batches of 64, 2 epochs: OneCycleLR's warm-up would end at step 0 (pct 0.25 x 4)
    training = TrainingSpec(epochs=2, batch_size=64, schedule="onecycle")
    metrics = fit(mlp(), data, [], training, lr=0.05, device=CPU, seed=0)
    assert 0.0 <= metrics["val_acc"] <= 1.0


class SparseBag(nn.Module):
    """A user's model whose embedding has sparse gradients: each feature's sign picks one of two rows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bag = nn.EmbeddingBag(12, 3, mode="sum", sparse=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bag((x > 0).long() + 2 * torch.arange(x.shape[1]))


def test_a_model_with_sparse_gradients_trains_with_sgd(data):
    # fused optimizer steps take no sparse gradients: such a model keeps the unfused step
    model = SparseBag()
    before = model.bag.weight.detach().clone()
    metrics = fit(model, data, [], TrainingSpec(epochs=3, batch_size=32, schedule="constant"), lr=0.1, device=CPU,
                  seed=0)
    assert not torch.equal(model.bag.weight, before)
    assert metrics["val_acc"] > 0.5  # the labels are sums of the first two signs: learnable by such a bag


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_steps_flops_are_what_torchs_flop_counter_counts(name):
    """The precision rule sees a model's real cost: forward and backward of every built-in model."""
    from torch.utils.flop_counter import FlopCounterMode

    shape = (64,) if name == "mlp" else (3, 32, 32)
    model = model_factory(name, {}, shape, 10)()
    x = torch.randn(8, *shape)
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)).backward()
    # 3x the forward: torch skips the first layer's input gradient (7 % of a digits MLP step, 0.2 % of a CNN's)
    assert step_flops(model, x) == pytest.approx(counter.get_total_flops(), rel=0.08)


def test_counting_a_steps_flops_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 2))
    model.train()
    before = copy.deepcopy(model.state_dict())
    assert step_flops(model, torch.randn(5, 3, 6, 6)) == 3 * 5 * (2 * 4 * 4 * 4 * 27 + 2 * 2 * 64)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm learnt nothing
    assert not any(m._forward_hooks for m in model.modules())
    # a transposed convolution: a dot product per input element and output channel
    assert step_flops(nn.ConvTranspose2d(3, 8, 3, stride=2), torch.randn(2, 3, 8, 8)) == 3 * 2 * (2 * 3 * 64) * 8 * 9


@pytest.mark.parametrize("bf16_cpu", [True, False], ids=["bf16-hardware", "no-bf16-hardware"])
def test_precision_follows_the_study_and_auto_takes_bfloat16_only_where_it_pays(monkeypatch, bf16_cpu):
    monkeypatch.setattr(_device, "native_bf16", lambda device: bf16_cpu)
    digits = model_factory("mlp", {}, (64,), 10)()
    cifar = model_factory("cnn", {}, (3, 32, 32), 10)().to(memory_format=torch.channels_last)
    small, large = torch.randn(64, 64), torch.randn(128, 3, 32, 32).to(memory_format=torch.channels_last)
    assert autocast_dtype("float32", CPU, cifar, large) is None
    assert autocast_dtype("bfloat16", CPU, digits, small) is torch.bfloat16
    # a digits step (30 MFLOP) gains nothing from bf16 on any CPU; a CIFAR step (8 GFLOP) does where the CPU
    # has bf16 arithmetic, and is many times slower where it has not
    assert autocast_dtype("auto", CPU, digits, small) is None
    assert autocast_dtype("auto", CPU, cifar, large) is (torch.bfloat16 if bf16_cpu else None)
    # on a GPU: whenever it has bf16 arithmetic (an older GPU trains in float32)
    assert autocast_dtype("auto", torch.device("cuda"), digits, small) is (torch.bfloat16 if bf16_cpu else None)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_a_trial_trains_and_is_measured_in_its_precision(data, precision):
    model = mlp()
    seen: dict[bool, set] = {True: set(), False: set()}
    model[0].register_forward_hook(lambda m, i, out: seen[m.training].add(out.dtype))
    training = TrainingSpec(epochs=10, batch_size=16, schedule="constant", precision=precision)
    metrics = fit(model, data, [], training, lr=0.1, device=CPU, seed=0)
    dtype = getattr(torch, precision)
    assert seen == {True: {dtype}, False: {dtype}}  # training steps and the eval-mode metrics alike
    assert next(model.parameters()).dtype == torch.float32  # weights stay float32 under autocast
    assert metrics["val_acc"] >= 0.8, metrics
