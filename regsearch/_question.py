"""Which study a run asks about: a study file with its `--set` values, or a stored study found by its name.

A stored study that recorded itself (`_study_record`) is resumed and confirmed as it was made: by its name alone,
or with the same file and `--set` values; anything that would change its question is refused in one line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from regsearch._errors import ConfigError, StorageError
from regsearch._spec import StudySpec
from regsearch._study_file import read_study_file, resolve, resolve_study
from regsearch._study_record import (
    PluginFile,
    StudyRecord,
    refuse_foreign_params,
    refuse_missing_plugins,
    refuse_other_data,
    refuse_other_question,
    spec_json,
    stored_record,
    write_record,
)


@dataclass(frozen=True)
class Question:
    """A run's study: its spec, its name in the storage, what it was resolved from, and what the storage holds."""

    spec: StudySpec
    name: str
    raw: dict[str, Any] | None
    overrides: tuple[tuple[str, Any], ...]
    plugins: tuple[str, ...]
    """Plugin files to load besides the study file's own (`spec.plugins`)."""
    data_dir: str | None
    stored: StudyRecord | None

    def record(self, data: Any, python_inputs: Sequence[str]) -> StudyRecord:
        from regsearch._study_record import data_fingerprint

        files = (*self.spec.plugins, *self.plugins)
        return StudyRecord(raw=self.raw, source=self.spec.source, spec=spec_json(self.spec),
                           plugins=tuple(PluginFile.of(p) for p in files), data_dir=self.data_dir,
                           data=data_fingerprint(data), python_inputs=tuple(python_inputs),
                           overrides=self.overrides)

    def check_inputs(self, python_inputs: Sequence[str]) -> None:
        """Refuse to run a study made with data or a model given in Python without them."""
        missing = [kind for kind in (self.stored.python_inputs if self.stored else ()) if kind not in python_inputs]
        if missing:
            raise ConfigError(f"study {self.name!r} was made with its {' and '.join(missing)} given in Python "
                              f"(regsearch.optimize({missing[0]}=...)); run it from Python with the same "
                              f"{' and '.join(missing)}")

    def remember(self, study: optuna.Study, data: Any, python_inputs: Sequence[str]) -> None:
        """Check a stored study's data against this run's, or store the record of a study that has none yet."""
        record = self.stored or stored_record(study)  # another machine may have made it since this run asked
        if record is not None:
            if self.stored is None:
                refuse_other_question(self.name, record, self.spec)
            refuse_other_data(self.name, record, data)
        elif not study.trials:
            write_record(study, self.record(data, python_inputs))
        else:
            refuse_foreign_params(study, self.spec)  # stored before studies recorded themselves


def ask(study: str | StudySpec, *, study_name: str | None = None, storage: str | None = None,
        overrides: Sequence[tuple[str, Any]] | Mapping[str, Any] = (), plugins: Sequence[str] = (),
        data_dir: str | None = None) -> Question:
    """The study a run asks about; a stored study of that name must be asked the same (see the module)."""
    pairs = tuple(overrides.items() if isinstance(overrides, Mapping) else overrides)
    if isinstance(study, StudySpec):
        name = study_name or study.name
        return _checked(Question(study, name, None, pairs, tuple(plugins), data_dir, _stored(name, storage)))
    file = _study_file(study)
    name = study_name or (file.stem if file is not None else study)
    stored = _stored(name, storage)
    if stored is not None and stored.raw is not None and not _is_path(study):
        if file is not None and study not in (name, Path(stored.source).stem):
            raise ConfigError(f"study {name!r} was made from {stored.source}, not from study {study!r}: give "
                              f"--study {name} to resume it, or another --study-name to start a new study")
        spec, raw = resolve(stored.raw, pairs, stored.source)
        return _checked(Question(spec, name, raw, (*stored.overrides, *pairs), tuple(plugins), data_dir, stored))
    if file is None:
        if stored is not None:  # made in Python: there is no file to read it from
            raise ConfigError(f"study {name!r} was made from a study given in Python; run it from Python with "
                              f"the same StudySpec, or give --study with a study file")
        resolve_study(study)  # raises: no such study (nor stored study of that name)
    given = (*stored.overrides, *pairs) if stored is not None else pairs
    spec, raw = resolve(read_study_file(file), given, file)
    return _checked(Question(spec, name, raw, given, tuple(plugins), data_dir, stored))


def _checked(question: Question) -> Question:
    """The question, refused when it differs from the stored one; stored plugins and data folder filled in."""
    from regsearch.data._tensors import FOLDER_DATASETS

    data = question.spec.data.name
    if question.data_dir is not None and data not in FOLDER_DATASETS:
        raise ConfigError(f"--data-dir {question.data_dir}: study {question.spec.name!r} reads no folder (its data is "
                          f"{data!r}{'; a table is given with --set data.path=FILE' if data == 'table' else ''})")
    stored = question.stored
    if stored is None:
        return question
    refuse_other_question(question.name, stored, question.spec)
    files = refuse_missing_plugins(question.name, stored, question.plugins, question.spec.plugins)
    return Question(question.spec, question.name, question.raw, question.overrides, files,
                    question.data_dir or stored.data_dir, stored)


def _is_path(study: str) -> bool:
    return "/" in study or study.endswith((".yaml", ".yml"))


def _study_file(study: str) -> Path | None:
    """The study file `study` names (a path, or a shipped study's name); None when it names none."""
    try:
        return resolve_study(study)
    except ConfigError:
        if _is_path(study):
            raise
        return None


def _stored(name: str, storage: str | None) -> StudyRecord | None:
    """The record of the stored study `name`; None where the storage or the study does not exist yet."""
    from regsearch._storage import open_storage

    try:
        optuna_storage = open_storage(storage, create=False)
    except StorageError:
        return None
    try:
        return stored_record(optuna.load_study(study_name=name, storage=optuna_storage))
    except KeyError:
        return None


def python_inputs(data: Any, model: Any) -> tuple[str, ...]:
    """What a call gave in Python instead of the study file: "data", "model"."""
    return tuple(kind for kind, given in (("data", data), ("model", model)) if given is not None)


def search_overrides(changes: Mapping[str, Any]) -> list[tuple[str, str]]:
    """`search.<key>` values given as options, as `--set` pairs (JSON text: read as YAML, a string stays one)."""
    return [(f"search.{key}", json.dumps(value)) for key, value in changes.items()]
