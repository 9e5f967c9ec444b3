"""What a study stores about itself, and the one check that a run asks the question the study was made with.

A study keeps its resolved study file (after `--set`, paths absolute), the plugin files it loaded with their
digests, where its data came from and a fingerprint of its splits. `optimize` (resuming), `confirm`, `show` and
`report` find it by name and use that; a run whose data, split, search space or plugins differ is refused in one
line naming what differs. Studies stored before this record existed are read as they were.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna

from regsearch._errors import ConfigError
from regsearch._spec import StudySpec

RECORD_ATTR = "regsearch.study"

FREE_KEYS = frozenset({"name", "source", "description", "searched", "data.path", "data.test_path",
                       "search.n_trials", "search.confirm", "search.register_model", "search.max_consecutive_failures",
                       "search.heartbeat_interval", "search.grace_period", "search.sampler", "search.pruner",
                       "search.objective", "search.max_gap", "search.reference"})
"""Keys a resumed study may change: its budget, how it is searched and confirmed, where its files lie (the data's
fingerprint checks those), and the objective and gap limit (refused on their own, with their own message)."""


@dataclass(frozen=True)
class PluginFile:
    """A plugin file a study loaded, with the SHA-256 of its bytes then."""

    path: str
    sha256: str

    @classmethod
    def of(cls, path: str) -> PluginFile:
        return cls(os.path.abspath(path), file_digest(path))


@dataclass(frozen=True)
class StudyRecord:
    """The question a study answers, as stored with it (a JSON study attribute)."""

    raw: dict[str, Any] | None
    """The study file after `--set`, its paths absolute; None for a `StudySpec` given in Python."""
    source: str
    spec: dict[str, Any]
    """The validated study as JSON, compared key by key on every rerun."""
    plugins: tuple[PluginFile, ...] = ()
    """Every plugin file the study loaded: its study file's own `plugins:` and those given with `--plugin`."""
    data_dir: str | None = None
    data: dict[str, Any] | None = None
    """`data_fingerprint` of the splits the study trained and validated on."""
    python_inputs: tuple[str, ...] = ()
    """"data" and/or "model" where the study was given them in Python: no command line can give them again."""
    overrides: tuple[tuple[str, Any], ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> StudyRecord:
        return cls(raw=value.get("raw"), source=value["source"], spec=value["spec"],
                   plugins=tuple(PluginFile(**p) for p in value.get("plugins", ())),
                   data_dir=value.get("data_dir"), data=value.get("data"),
                   python_inputs=tuple(value.get("python_inputs", ())),
                   overrides=tuple(tuple(pair) for pair in value.get("overrides", ())))


def file_digest(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as exc:
        raise ConfigError(f"plugin file {path}: cannot read it: {exc.strerror or exc}") from None


def spec_json(spec: StudySpec) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydantic warns that a Range is dumped as its fields, which is the point
        return json.loads(json.dumps(spec.model_dump(mode="json"), default=str))


def stored_record(study: optuna.Study) -> StudyRecord | None:
    value = study.user_attrs.get(RECORD_ATTR)
    return StudyRecord.from_json(value) if isinstance(value, Mapping) else None


def write_record(study: optuna.Study, record: StudyRecord) -> None:
    study.set_user_attr(RECORD_ATTR, record.to_json())


def _is_range(value: Any) -> bool:
    return isinstance(value, Mapping) and {"low", "high"} <= set(value)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value and not _is_range(value):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _free(key: str) -> bool:
    return any(key == free or key.startswith(f"{free}.") for free in FREE_KEYS)


def first_difference(stored: Mapping[str, Any], now: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
    """The first key (dotted, as a study file writes it) whose value differs between two `spec_json`s, outside
    `FREE_KEYS`."""
    a, b = _flat(_as_written(stored)), _flat(_as_written(now))
    for key in sorted(set(a) | set(b)):
        if not _free(key) and a.get(key) != b.get(key):
            return key, a.get(key), b.get(key)
    return None


def _as_written(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A `spec_json` keyed as a study file is: a model's and a regularizer's options beside their name."""
    out = dict(spec)
    model = dict(spec.get("model") or {})
    out["model"] = {**{k: v for k, v in model.items() if k != "options"}, **(model.get("options") or {})}
    out["regularizers"] = {r["name"]: {**{k: v for k, v in r.items() if k not in ("name", "options")},
                                       **(r.get("options") or {})} for r in spec.get("regularizers") or ()}
    return out


def refuse_other_question(name: str, stored: StudyRecord, spec: StudySpec) -> None:
    """Refuse a run whose study differs from the stored one, naming the first key that differs."""
    found = first_difference(stored.spec, spec_json(spec))
    if found is None:
        return
    key, was, now = found
    raise ConfigError(f"study {name!r} was made with {key}={_shown(was)}; this run has {_shown(now)}. A study answers "
                      f"one question: rerun without the change to resume it, or give another --study-name to start "
                      f"a new study")


def _shown(value: Any) -> str:
    if _is_range(value):
        return f"[{value['low']:g}, {value['high']:g}]" + (" log" if value.get("log") else "")
    return "(none)" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def data_fingerprint(data: Any) -> dict[str, Any]:
    """The splits' sizes, a digest of their labels in order and per-channel (per-column) means of their inputs.

    The labels say whether the same rows landed in each split; the means whether the inputs are the same ones
    (compared with a tolerance: float preprocessing may differ in its last bits between machines).
    """
    import torch

    labels = hashlib.sha256()
    sizes, means = {}, {}
    for split in ("train", "val", "test"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        if y is None:
            continue
        sizes[split] = len(y)
        labels.update(split.encode() + y.detach().cpu().to(torch.int64).numpy().tobytes())
        rows = x[:: max(1, len(x) // 4096)].detach().cpu().float()
        per = rows.mean(dim=(0, 2, 3)) if rows.ndim == 4 else rows.mean(dim=0) if rows.ndim == 2 else rows.mean()
        means[split] = [round(float(v), 6) for v in per.reshape(-1)]
    return {"sizes": sizes, "labels": labels.hexdigest(), "means": means, "shape": list(data.input_shape)}


def data_difference(stored: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """What differs between two `data_fingerprint`s, in words; None when they match."""
    if stored.get("sizes") != now.get("sizes"):
        return f"its splits held {_sizes(stored)}; this run's hold {_sizes(now)}"
    if "shape" in stored and stored["shape"] != now.get("shape"):
        return f"its inputs had shape {tuple(stored['shape'])}; this run's have {tuple(now.get('shape') or ())}"
    if stored.get("labels") != now.get("labels"):
        return "its splits hold other rows (their labels differ: another file, val_fraction, seed or group_repeats)"
    for split, values in (stored.get("means") or {}).items():
        other = (now.get("means") or {}).get(split) or []
        if len(other) != len(values) or any(not math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)
                                            for a, b in zip(values, other)):
            return f"the inputs of its {split} split differ (another file, or other preprocessing)"
    return None


def _sizes(fingerprint: Mapping[str, Any]) -> str:
    return ", ".join(f"{n} {split}" for split, n in (fingerprint.get("sizes") or {}).items())


def refuse_other_data(name: str, stored: StudyRecord, data: Any) -> None:
    if stored.data is None:
        return
    problem = _old_image_size(stored, data) or data_difference(stored.data, data_fingerprint(data))
    if problem:
        raise ConfigError(f"study {name!r} was trained on other data: {problem}. Give the data it was made with, or "
                          f"another --study-name to start a new study")


def refuse_missing_plugins(name: str, stored: StudyRecord, given: Sequence[str], own: Sequence[str]
                           ) -> tuple[str, ...]:
    """The plugin files to load besides the study file's `own`: the stored ones, each still there with the same
    bytes or given again (moved), and any new ones `given`. A stored file that cannot be loaded as it was is refused."""
    by_digest = {file_digest(p): os.path.abspath(p) for p in given}
    own = {os.path.abspath(p) for p in own}
    files = []
    for plugin in stored.plugins:
        if plugin.sha256 in by_digest:
            files.append(by_digest.pop(plugin.sha256))
            continue
        if not os.path.isfile(plugin.path):
            problem = "no such file"
        elif file_digest(plugin.path) != plugin.sha256:
            problem = "the file has changed since"
        else:
            files.append(plugin.path)
            continue
        raise ConfigError(f"study {name!r} used the plugin file {plugin.path}, which cannot be loaded as it was "
                          f"({problem}): give --plugin with that file as it was, or another --study-name to start "
                          f"a new study")
    return tuple(p for p in (*files, *by_digest.values()) if p not in own)


def refuse_foreign_params(study: optuna.Study, spec: StudySpec) -> None:
    """Refuse a study (stored without its record) whose trials searched a regularizer this spec does not have:
    retraining them without it would confirm another configuration than the one that ran."""
    known = {"lr", "model", "training", "choice", *(r.name for r in spec.regularizers)}
    for trial in study.get_trials(deepcopy=False):
        foreign = sorted({key.split(".", 1)[0] for key in trial.params} - known)
        if foreign:
            raise ConfigError(f"trial {trial.number} of study {study.study_name!r} searched the regularizer "
                              f"{foreign[0]!r}, which this run does not have: give the --plugin and --set values "
                              f"the study was run with")


def _old_image_size(stored: StudyRecord, data: Any) -> str | None:
    """An images study recorded before the fingerprint held the input shape, made without data.image_size: its
    images were resized to 64, the default then; this version keeps smaller ones at their own size."""
    decoding = getattr(data, "decoding", None)
    given = ((stored.spec or {}).get("data") or {}).get("image_size")
    if "shape" in stored.data or decoding is None or given is not None or decoding.size == 64:
        return None
    return (f"its images were resized to 64 x 64 (the default when it was made), this run's to {decoding.size} x "
            f"{decoding.size} (their own size, today's default), and a study's image_size cannot change")
