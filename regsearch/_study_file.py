"""Study files: found by name or path, read as safe YAML (no key twice), changed by `--set`, then validated."""

from __future__ import annotations

import typing
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from regsearch._errors import ConfigError, unknown_name

if TYPE_CHECKING:  # the spec (and pydantic) is imported when a study is validated: `regsearch studies` needs neither
    from regsearch._spec import StudySpec

_PACKAGE_STUDIES = Path(__file__).resolve().parent / "studies"
_CHECKOUT_STUDIES = Path(__file__).resolve().parent.parent / "studies"

Overrides = Mapping[str, str] | list[tuple[str, str]]


def study_dirs() -> list[Path]:
    """Where `--study NAME` looks: the installed package's studies, then a source checkout's."""
    return [d for d in (_PACKAGE_STUDIES, _CHECKOUT_STUDIES) if d.is_dir()]


def available_studies() -> dict[str, Path]:
    """Study name -> file, for every shipped study."""
    found: dict[str, Path] = {}
    for d in study_dirs():
        for path in sorted(d.glob("*.yaml")):
            found.setdefault(path.stem, path)
    return found


def resolve_study(name_or_path: str) -> Path:
    """A shipped study's file by name, or the path as given."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists() or "/" in name_or_path:
        if not path.is_file():
            raise ConfigError(f"study file {name_or_path} does not exist")
        return path
    known = available_studies()
    if name_or_path not in known:
        raise ConfigError(unknown_name("study", name_or_path, known))
    return known[name_or_path]


class _StudyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping (PyYAML keeps the last silently)."""


def _unique_keys(loader: _StudyLoader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden on purpose
            continue
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, typing.Hashable):
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StudyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_keys)


def read_study_file(path: Path) -> Any:
    """The parsed YAML of a study file, loaded safely (no object construction)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read study file {path}: {exc}") from None
    try:
        return yaml.load(text, Loader=_StudyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{at}: {problem}") from None


_ONE_BUDGET = {"training.epochs": "steps", "training.steps": "epochs"}


def apply_overrides(raw: Any, overrides: Overrides) -> Any:
    """Set dotted keys (`training.epochs=5`) in a parsed study file; values are read as YAML scalars."""
    raw = dict(raw or {})
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    for key, text in items:
        parts = key.split(".")
        if not key or any(not p for p in parts):
            raise ConfigError(f"--set {key}={text}: the key must be dotted names like training.epochs")
        try:
            value = yaml.safe_load(text) if isinstance(text, str) else text
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}={text}: the value is not a YAML scalar") from None
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, Mapping):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a mapping")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
        if key in _ONE_BUDGET:  # a budget given with --set replaces the file's other one
            node.pop(_ONE_BUDGET[key], None)
    return raw


def _set_paths_from_cwd(raw: dict, overrides: Overrides) -> dict:
    """File paths given with --set (the table's, the model's weights), made absolute from the current folder (the
    file's own are read from its folder)."""
    import os

    from regsearch._spec import MODEL_PATHS, TABLE_PATHS

    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    keys = {key for key, _ in items}
    for section, names in (("data", TABLE_PATHS), ("model", MODEL_PATHS)):
        node = raw.get(section)
        if not isinstance(node, Mapping):
            continue
        node = dict(node)
        for name in names:
            value = node.get(name)
            if (section in keys or f"{section}.{name}" in keys) and isinstance(value, str) and value:
                node[name] = os.path.abspath(os.path.expanduser(value))
        raw = {**raw, section: node}
    return raw


def load_study(name_or_path: str, overrides: Overrides = ()) -> StudySpec:
    """Find, read, override and validate a study file."""
    path = resolve_study(name_or_path)
    return resolve(read_study_file(path), overrides, path)[0]


def resolve(raw: Any, overrides: Overrides, path: Path | str) -> tuple[StudySpec, dict]:
    """A parsed study file with `overrides` set, validated: (the spec, the file as resolved, its paths absolute).

    The resolved file is what a study stores about itself: validated again anywhere, it gives the same spec.
    """
    from regsearch._spec import absolute_paths, spec_from_dict

    path = Path(path)
    if overrides:
        if raw is None:
            raise ConfigError(f"{path}: the study file is empty")
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path}: a study file is a mapping of keys; got a {type(raw).__name__}")
        raw = _set_paths_from_cwd(apply_overrides(raw, overrides), overrides)
    try:
        spec = spec_from_dict(raw, name=path.stem, source=str(path))
    except ConfigError as exc:
        text = str(exc)
        items = overrides.items() if isinstance(overrides, Mapping) else overrides
        for key, value in reversed(list(items)):  # a value given with --set is named as the user typed it
            if text.startswith((f"{key}:", f"{key}.")):
                raise ConfigError(f"--set {key}={value}: {text}") from None
        raise ConfigError(f"{path.name}: {text}") from None
    return spec, absolute_paths(raw, str(path))


def describe(path: Path) -> str:
    """The one-line description of a study file, '' when it has none or cannot be read."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return ""
    return str(raw.get("description", "")).strip().splitlines()[0] if isinstance(raw, Mapping) and raw.get(
        "description") else ""
