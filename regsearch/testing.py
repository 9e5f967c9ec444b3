"""A kit for plugin authors: check a `Regularizer` class against regsearch's contract, on CPU, from pytest.

In a plugin's test module, one line runs every check as its own test::

    test_contract = regsearch.testing.contract_tests(MyRegularizer, (MyRegularizer, {"strength": 1e-3}))

or, anywhere, ``regsearch.testing.check_regularizer(MyRegularizer, strength=1e-3)`` raises an AssertionError
naming the plugin and the broken rule. The checks build three small models (an MLP on flat inputs, a CNN and a
two-stage ResNet on 8x8 images) and train them for a few CPU steps; a plugin may refuse some of them with a
`ConfigError` (cutout needs images, drop_path residual branches, batchnorm a layer without one), not all.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

import optuna
import torch
from torch import nn

from regsearch import _contract
from regsearch._errors import ConfigError, PluginError
from regsearch._registry import _check_contract
from regsearch._regularizer import Applied, LoopState, NamespacedTrial, Regularizer, TrialContext
from regsearch._spec import TrainingSpec
from regsearch._trainer import evaluate, fit
from regsearch.data._tensors import Batcher, TensorData
from regsearch.surgery import trace

__all__ = ["CHECKS", "check_regularizer", "contract_tests"]

CPU = torch.device("cpu")
CLASSES = 3
TRAINING = TrainingSpec(epochs=3, batch_size=16, schedule="constant", eval_batch_size=64, precision="float32")
LR = 0.05


def _name(cls: type) -> str:
    return getattr(cls, "name", "") or re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", cls.__name__).lower()


def _fail(cls: type, rule: str) -> AssertionError:
    return AssertionError(f"regularizer {_name(cls)!r} ({cls.__module__}.{cls.__qualname__}): {rule}")


def _data(kind: str) -> TensorData:
    gen = torch.Generator().manual_seed(0)
    if kind == "flat":
        x = torch.randn(96, 6, generator=gen)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    else:
        x = torch.randint(0, 256, (96, 3, 8, 8), generator=gen, dtype=torch.uint8)
        y = (x[:, 0, :4].float().mean((1, 2)) > x[:, 0, 4:].float().mean((1, 2))).long() * 2
    return TensorData.from_arrays(x, y, val_fraction=0.25, num_classes=CLASSES, name=f"{kind}-check")


KINDS = {"flat": "a small MLP", "image": "a small CNN", "residual": "a small ResNet"}
"""The models of the kit, by the data they take (`residual` takes the image data)."""


def _model(kind: str) -> nn.Module:
    if kind == "flat":
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, CLASSES))
    if kind == "residual":
        from regsearch.models import resnet18

        return resnet18((3, 8, 8), CLASSES, width=4, depth=(1, 1), stem="small")
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, CLASSES))


@contextlib.contextmanager
def _quiet_optuna():
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line per check
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


class _Case:
    """One plugin class with options, and what each check needs to run a trial of it."""

    def __init__(self, cls: type, options: Mapping[str, Any]) -> None:
        self.cls, self.options, self.name = cls, dict(options), _name(cls)
        image = _data("image")
        self.datasets = {"flat": _data("flat"), "image": image, "residual": image}

    def fail(self, rule: str) -> AssertionError:
        return _fail(self.cls, rule)

    def create(self) -> Regularizer:
        try:
            return self.cls(**self.options)
        except Exception as exc:
            raise self.fail(f"the constructor refused options {self.options!r}: {type(exc).__name__}: {exc}") from exc

    def sample(self, reg: Regularizer, seed: int, kind: str) -> dict[str, Any]:
        """The Optuna parameters (namespaced keys) of a random trial of this plugin."""
        with _quiet_optuna():
            study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        trial = study.ask()
        model = _model(kind)
        reg.context = self.context(model, kind, seed)
        reg.search_space(NamespacedTrial(trial, self.name))
        return dict(trial.params)

    def context(self, model: nn.Module, kind: str, seed: int) -> TrialContext:
        example = Batcher(self.datasets[kind]).inputs(self.datasets[kind].x_train[:4])
        return TrialContext(example_input=example, device=CPU, trial_number=seed, seed=seed, model=model,
                            sites=trace(model, example))

    def build(self, reg: Regularizer, trial_params: Mapping[str, Any], kind: str, seed: int
              ) -> tuple[nn.Module, dict[str, Any]]:
        """A fresh model changed by `reg` for a trial with these parameters (as `regsearch` builds a trial)."""
        torch.manual_seed(seed)
        model = _model(kind)
        reg.context = self.context(model, kind, seed)
        params = self.kept(_contract.search_space_params,
                           reg.search_space(NamespacedTrial(optuna.trial.FixedTrial(dict(trial_params)), self.name)))
        return self.kept(_contract.transformed_model, reg.transform_model(model, params)), params

    def kept(self, check: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`check(*args)` from `regsearch._contract`, its broken rule said as this plugin's failure."""
        try:
            return check(*args, **kwargs)
        except PluginError as exc:
            raise self.fail(str(exc)) from None

    def kinds(self) -> list[str]:
        """The model kinds this plugin accepts (it may refuse some with a ConfigError, not all)."""
        accepted, refusals = [], []
        for kind in KINDS:
            try:
                self.build(self.create(), self.sample(self.create(), 0, kind), kind, 0)
            except ConfigError as exc:
                refusals.append(f"{kind}: {exc}")
                continue
            accepted.append(kind)
        if not accepted:
            raise self.fail(f"refuses every model of the kit ({', '.join(KINDS.values())}): {'; '.join(refusals)}")
        return accepted

    def train(self, reg: Regularizer, trial_params: Mapping[str, Any], kind: str, seed: int
              ) -> tuple[nn.Module, dict[str, float]]:
        model, params = self.build(reg, trial_params, kind, seed)
        try:
            metrics = fit(model, self.datasets[kind], [Applied(reg, params)], TRAINING, lr=LR, device=CPU, seed=seed)
        except PluginError as exc:
            raise self.fail(str(exc)) from exc
        return model, metrics


# --- the checks ----------------------------------------------------------------------------------------------

def check_description(case: _Case) -> None:
    """A one-line class docstring (`regsearch plugins` shows it) and a constructor that takes the options."""
    doc = inspect.getdoc(case.cls) or ""
    if not doc.strip() or doc == inspect.getdoc(Regularizer):
        raise case.fail("has no class docstring; its first line is the description `regsearch plugins` shows")
    case.create()


def check_hook_signatures(case: _Case) -> None:
    """Every hook it defines takes the parameters the framework passes."""
    try:
        _check_contract(case.cls, case.name, "regsearch.testing")
    except PluginError as exc:
        raise AssertionError(str(exc)) from None


def check_search_space(case: _Case) -> None:
    """Parameters land under the plugin's namespace, `enabled` is left to the framework, values are reproducible."""
    for kind in case.kinds():
        reg = case.create()
        trial_params = case.sample(reg, 0, kind)
        outside = [k for k in trial_params if not k.startswith(f"{case.name}.")]
        if outside:
            raise case.fail(f"suggested {outside} outside its namespace {case.name!r}: suggest on the trial it is "
                            f"given, never on another")
        if f"{case.name}.enabled" in trial_params:
            raise case.fail(f"suggests '{case.name}.enabled', the framework's on/off switch; use another name")
        _, first = case.build(case.create(), trial_params, kind, 0)
        _, again = case.build(reg, trial_params, kind, 0)
        if first != again:
            raise case.fail(f"search_space returned {first!r}, then {again!r} for the same trial parameters")


def check_transform_model(case: _Case) -> None:
    """The changed model still maps a batch to (N, classes) logits, and in eval mode it is deterministic and
    treats each example on its own (no dropout, no batch statistics)."""
    for kind in case.kinds():
        reg = case.create()
        model, _ = case.build(reg, case.sample(reg, 0, kind), kind, 0)
        x = Batcher(case.datasets[kind]).inputs(case.datasets[kind].x_train[:8])
        _check_eval(case, model, x, "after transform_model")
        model.train()
        out = model(x)
        if tuple(out.shape) != (8, CLASSES):
            raise case.fail(f"after transform_model the model returns {tuple(out.shape)} in train mode; "
                            f"expected (8, {CLASSES})")


def _check_eval(case: _Case, model: nn.Module, x: torch.Tensor, when: str) -> None:
    model.eval()
    with torch.no_grad():
        out, again, first = model(x), model(x), model(x[:1])
    if tuple(out.shape) != (len(x), CLASSES):
        raise case.fail(f"{when} the model returns {tuple(out.shape)} in eval mode; expected ({len(x)}, {CLASSES})")
    if not torch.equal(out, again):
        raise case.fail(f"{when} the model is random in eval mode (a training-only change must check "
                        f"self.training)")
    if not torch.allclose(first, out[:1], atol=1e-4, rtol=1e-4):
        raise case.fail(f"{when} an example's eval-mode output depends on the rest of the batch (batch statistics "
                        f"used in eval mode)")


def check_training_hooks(case: _Case) -> None:
    """transform_batch returns a usable batch, penalty a scalar on the model's device, and a short training run
    ends with finite eval-mode metrics of the model the caller holds."""
    for kind in case.kinds():
        data = case.datasets[kind]
        reg = case.create()
        model, params = case.build(reg, case.sample(reg, 0, kind), kind, 0)
        model.train()
        case.kept(_contract.penalty_term, reg.penalty(model, params), CPU, strict=True)
        x = Batcher(data).inputs(data.x_train[:8])
        y = data.y_train[:8]
        soft = torch.nn.functional.one_hot(y, CLASSES).float()
        state = LoopState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), epochs=1,
                          num_classes=CLASSES, inputs=lambda: iter([x]))
        reg.on_train_start(state, params)
        for labels in (y, soft):  # int labels, or soft targets from a plugin before it
            result = reg.transform_batch(x.clone(), labels.clone(), params)
            case.kept(_contract.batch, result, x, CLASSES, strict=True)
            out = model(result[0])
            if tuple(out.shape) != (len(x), CLASSES):
                raise case.fail(f"the model returns {tuple(out.shape)} on the batch transform_batch made")
        reg.on_train_end(state, params)

        reg = case.create()
        model, metrics = case.train(reg, case.sample(reg, 0, kind), kind, 0)
        bad = {k: v for k, v in metrics.items() if not torch.isfinite(torch.tensor(v))}
        if bad:
            raise case.fail(f"a 3-epoch training run on a {kind} model ended with non-finite metrics {bad}")
        loss, acc = evaluate(model, Batcher(data), data.x_val, data.y_val, 64)
        if abs(loss - metrics["val_loss"]) > 1e-4 * max(1.0, abs(loss)) or abs(acc - metrics["val_acc"]) > 1e-6:
            raise case.fail(f"the trained model scores val_loss {loss:.5f}, but the trial reported "
                            f"{metrics['val_loss']:.5f}: the model left behind is not the one evaluated")
        _check_eval(case, model, Batcher(data).inputs(data.x_val[:8]), "after training")


def check_no_state_between_trials(case: _Case) -> None:
    """One instance serves every trial of a study: a trial run after another one ends exactly as if it ran first."""
    kind = case.kinds()[0]
    shared = case.create()
    first_params = case.sample(case.create(), 0, kind)
    other_params = case.sample(case.create(), 1, kind)
    first_model, first = case.train(shared, first_params, kind, 3)
    case.train(shared, other_params, kind, 4)
    again_model, again = case.train(shared, first_params, kind, 3)
    fresh_model, fresh = case.train(case.create(), first_params, kind, 3)
    for label, metrics, model in (("the same instance", again, again_model), ("a new instance", fresh, fresh_model)):
        same = all(abs(metrics[k] - first[k]) <= 1e-5 * max(1.0, abs(first[k])) for k in first)
        weights = zip(model.state_dict().values(), first_model.state_dict().values())
        if not same or not all(torch.allclose(a.float(), b.float(), atol=1e-5) for a, b in weights):
            raise case.fail(f"a trial repeated with {label} after another trial ended differently "
                            f"(val_loss {first['val_loss']:.6f} then {metrics['val_loss']:.6f}): reset per-trial "
                            f"state in on_train_start, and draw randomness from torch's seeded generator")


CHECKS: dict[str, Callable[[_Case], None]] = {
    "description": check_description,
    "hook_signatures": check_hook_signatures,
    "search_space": check_search_space,
    "transform_model": check_transform_model,
    "training_hooks": check_training_hooks,
    "no_state_between_trials": check_no_state_between_trials,
}
"""Each check by name; `check_regularizer` runs them in this order."""


def check_regularizer(cls: type[Regularizer], **options: Any) -> None:
    """Run every contract check on `cls` built with `options`; raises AssertionError naming the broken rule."""
    case = _Case(cls, options)
    for name in CHECKS:
        _run(case, name)


def _run(case: _Case, check_name: str) -> None:
    try:
        CHECKS[check_name](case)
    except AssertionError:
        raise
    except Exception as exc:  # the plugin's own code raised: report it as the broken check, naming the plugin
        raise case.fail(f"{check_name} check: {type(exc).__name__}: {exc}") from exc


def contract_tests(*plugins: type[Regularizer] | tuple[type[Regularizer], Mapping[str, Any]]):
    """A pytest test function parametrised with every check for every plugin (a class, or (class, options)).

    Assign it to a ``test_`` name in a test module: ``test_contract = contract_tests(MyRegularizer)``.
    """
    import pytest

    cases, ids = [], []
    for plugin in plugins:
        cls, options = plugin if isinstance(plugin, tuple) else (plugin, {})
        label = _name(cls) + (f"({', '.join(f'{k}={v!r}' for k, v in options.items())})" if options else "")
        for check_name in CHECKS:
            cases.append((cls, dict(options), check_name))
            ids.append(f"{label}-{check_name}")

    @pytest.mark.parametrize("cls, options, check_name", cases, ids=ids)
    def test_regularizer_contract(cls, options, check_name):
        _run(_Case(cls, options), check_name)

    return test_regularizer_contract
