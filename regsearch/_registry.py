"""The regularizer registry: built-ins, entry-point packages and plugin files through one door."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regsearch._errors import ConfigError, PluginError, unknown_name
from regsearch._options import call_with_options, checked_options
from regsearch._regularizer import HOOKS, Regularizer

ENTRY_POINT_GROUP = "regsearch.regularizers"
EXTRAS = frozenset({"label_smoothing", "mixup", "cutout", "cutmix", "max_norm", "swa", "gaussian_noise"})
"""The regularizers of the plugin package in this repository's plugins/ (named when one is missing)."""
AUTOLOAD_ENV = "REGSEARCH_DISABLE_PLUGIN_AUTOLOAD"
"""Set to 1 to load only regsearch's own regularizers from entry points (third-party ones are skipped)."""
PLUGIN_MODULE_PREFIX = "regsearch_plugin_"
"""The start of the module name a plugin file is imported under (another process cannot import it by name)."""

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class RegularizerInfo:
    """A registered regularizer: its name, class and where it came from."""

    name: str
    cls: type[Regularizer]
    source: str

    @property
    def description(self) -> str:
        doc = inspect.getdoc(self.cls) or ""
        return doc.splitlines()[0] if doc else ""


def _check_contract(cls: Any, name: str, source: str) -> None:
    who = f"regularizer {name!r} ({source})"
    if not (isinstance(cls, type) and issubclass(cls, Regularizer)):
        raise PluginError(f"{who}: {cls!r} is not a subclass of regsearch.Regularizer")
    if not _NAME.match(name):
        raise PluginError(f"{who}: a name is lower-case letters, digits and '_' (it prefixes parameter names)")
    if getattr(cls.search_space, "__isabstractmethod__", False):
        raise PluginError(f"{who}: {cls.__name__} does not define search_space(self, trial)")
    for hook, wanted in HOOKS.items():
        method = getattr(cls, hook)
        if not callable(method):
            raise PluginError(f"{who}: {hook} is not a method")
        try:
            inspect.signature(method).bind(None, *wanted)
        except TypeError:
            expected = ", ".join(("self", *wanted))
            raise PluginError(f"{who}: {cls.__name__}.{hook}{inspect.signature(method)} does not take "
                              f"({expected})") from None


class RegularizerRegistry:
    """Name -> `RegularizerInfo`; registering a name twice is an error, never an overwrite."""

    def __init__(self) -> None:
        self._entries: dict[str, RegularizerInfo] = {}
        self._files: set[Path] = set()

    def add(self, cls: type[Regularizer], name: str, source: str) -> RegularizerInfo:
        """Validate `cls` against the contract and register it under `name`."""
        _check_contract(cls, name, source)
        existing = self._entries.get(name)
        if existing is not None:
            if existing.cls is cls:
                return existing
            raise PluginError(f"regularizer {name!r} is registered twice: by {existing.source} and by {source}")
        info = RegularizerInfo(name, cls, source)
        self._entries[name] = info
        cls.name = name
        return info

    def get(self, name: str) -> RegularizerInfo:
        if name not in self._entries:
            hint = (f"; {name!r} comes with the regsearch-extras package: pip install ./plugins/regsearch-extras"
                    if name in EXTRAS else "")
            raise ConfigError(unknown_name("regularizer", name, self._entries) + hint)
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[RegularizerInfo]:
        return iter(sorted(self._entries.values(), key=lambda info: info.name))

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def create(self, name: str, options: Mapping[str, Any], where: str | None = None) -> Regularizer:
        """An instance of `name` built from a study file's options; bad options name the key."""
        where = where or f"regularizers.{name}"
        info = self.get(name)
        return call_with_options(info.cls, checked_options(info.cls, options, where), where, name)

    # --- loading -----------------------------------------------------------------------------------------

    def load_entry_points(self, *, third_party: bool | None = None) -> None:
        """Register every entry point of the `regsearch.regularizers` group (regsearch's own included)."""
        if third_party is None:
            third_party = os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in ("1", "true", "yes")
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist
            dist_name = dist.metadata["Name"] if dist is not None else "?"
            own = dist_name == "regsearch"
            if not own and not third_party:
                continue
            source = "built-in" if own else f"package {dist_name} {dist.version if dist else ''}".rstrip()
            try:
                cls = ep.load()
            except Exception as exc:  # any import failure of a third-party module is reported, named
                raise PluginError(f"regularizer {ep.name!r} ({source}, entry point {ep.value}): cannot be "
                                  f"imported: {type(exc).__name__}: {exc}") from exc
            self.add(cls, ep.name, source)

    def load_file(self, path: str | os.PathLike[str]) -> list[RegularizerInfo]:
        """Import a plugin file; every class it decorates with `@regsearch.register` joins this registry."""
        try:
            path = Path(path).expanduser().resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop: RuntimeError before Python 3.13
            raise PluginError(f"plugin file {path} cannot be read: {exc}") from None
        if path in self._files:
            return []
        if not path.is_file():
            raise PluginError(f"plugin file {path} does not exist")
        if not os.access(path, os.R_OK):
            raise PluginError(f"plugin file {path} is not readable")
        module_name = f"{PLUGIN_MODULE_PREFIX}{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}_{abs(hash(path)):x}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise PluginError(f"plugin file {path} cannot be imported (is it a .py file?)")
        module = importlib.util.module_from_spec(spec)
        before = set(self._entries)
        token = _LOADING.set_target(self, f"file {path}")
        try:
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        except PluginError:
            sys.modules.pop(module_name, None)
            raise
        except SyntaxError as exc:
            sys.modules.pop(module_name, None)
            raise PluginError(f"plugin file {path}: syntax error at line {exc.lineno}: {exc.msg}") from exc
        except Exception as exc:  # the plugin's own import-time code failed; report it with its origin
            sys.modules.pop(module_name, None)
            raise PluginError(f"plugin file {path}: cannot be imported: {type(exc).__name__}: {exc}") from exc
        finally:
            _LOADING.reset(token)
        added = [self._entries[n] for n in sorted(set(self._entries) - before)]
        if not added:
            raise PluginError(f"plugin file {path} registers no regularizer (decorate a Regularizer subclass "
                              f"with @regsearch.register('name'))")
        self._files.add(path)
        return added


class _LoadingTarget:
    """Where `@register` puts a class: the registry loading a file, else the default registry."""

    def __init__(self) -> None:
        self._stack: list[tuple[RegularizerRegistry, str]] = []

    def set_target(self, registry: RegularizerRegistry, source: str) -> int:
        self._stack.append((registry, source))
        return len(self._stack) - 1

    def reset(self, token: int) -> None:
        del self._stack[token:]

    def current(self) -> tuple[RegularizerRegistry, str] | None:
        return self._stack[-1] if self._stack else None


_LOADING = _LoadingTarget()
_default: RegularizerRegistry | None = None


def default_registry() -> RegularizerRegistry:
    """The process-wide registry, with every entry-point regularizer loaded on first use."""
    global _default
    if _default is None:
        registry = RegularizerRegistry()
        _default = registry
        try:
            registry.load_entry_points()
        except BaseException:
            _default = None
            raise
    return _default


def register(name: str):
    """Class decorator: register a `Regularizer` subclass under `name`.

    In a plugin file loaded with ``--plugin`` (or a study's ``plugins:`` list) the class joins the registry
    loading that file; anywhere else it joins the default registry.
    """

    def decorate(cls: type[Regularizer]) -> type[Regularizer]:
        target = _LOADING.current()
        if target is not None:
            registry, source = target
        else:
            registry = default_registry()
            module = sys.modules.get(getattr(cls, "__module__", ""), None)
            where = getattr(module, "__file__", None) or getattr(cls, "__module__", "?")
            source = f"module {getattr(cls, '__module__', '?')} ({where})"
        registry.add(cls, name, source)
        return cls

    if not isinstance(name, str):
        raise PluginError(f"@regsearch.register takes the regularizer's name, e.g. @register('my_reg'); "
                          f"got {name!r}")
    return decorate
