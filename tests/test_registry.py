"""The registry: entry points, plugin files, and load-time errors that name the plugin and its source."""

from __future__ import annotations

import textwrap

import pytest

from regsearch import PluginError, Regularizer, RegularizerRegistry, register
from regsearch._registry import ENTRY_POINT_GROUP

GOOD = """
    import regsearch

    @regsearch.register("{name}")
    class Shrink(regsearch.Regularizer):
        '''Shrinks nothing; a test plugin.'''

        def __init__(self, scale=1.0):
            self.scale = scale

        def search_space(self, trial):
            return {{"scale": trial.suggest_float("scale", 0.1, self.scale)}}
"""


def write(tmp_path, name: str, body: str):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


@pytest.fixture
def registry() -> RegularizerRegistry:
    reg = RegularizerRegistry()
    reg.load_entry_points()
    return reg


def test_entry_points_register_the_builtins(registry):
    assert registry.names() == ["augment", "batchnorm", "drop_path", "dropout", "early_stopping", "l1", "l2"]
    assert registry.names("l*") == ["l1", "l2"]


def test_a_plugin_file_registers_its_classes_with_the_file_as_source(registry, tmp_path):
    path = write(tmp_path, "shrink.py", GOOD.format(name="shrink"))
    added = registry.load_file(path)
    assert [info.name for info in added] == ["shrink"]
    assert registry.get("shrink").source == f"file {path}"
    assert registry.get("shrink").description == "Shrinks nothing; a test plugin."
    assert registry.load_file(path) == []  # the same file twice is loaded once


def test_a_duplicate_name_is_an_error_naming_both_sources(registry, tmp_path):
    path = write(tmp_path, "dup.py", GOOD.format(name="l1"))
    with pytest.raises(PluginError, match=r"'l1' is registered twice: by built-in and by file .*dup\.py"):
        registry.load_file(path)


@pytest.mark.parametrize("body, message", [
    ("def broken(:\n    pass\n", r"syntax error at line 1"),
    ("import no_such_module_here\n", r"cannot be imported: ModuleNotFoundError: No module named"),
    ("raise RuntimeError('boom at import')\n", r"cannot be imported: RuntimeError: boom at import"),
    ("import regsearch\n@regsearch.register('plain')\nclass Plain:\n    pass\n", r"is not a subclass of regsearch"),
    ("import regsearch\n@regsearch.register('nospace')\nclass N(regsearch.Regularizer):\n    pass\n",
     r"does not define search_space"),
    ("import regsearch\n@regsearch.register('badhook')\nclass B(regsearch.Regularizer):\n"
     "    def search_space(self, trial):\n        return {}\n"
     "    def penalty(self, model):\n        return None\n", r"B\.penalty\(self, model\) does not take \(self, model, params\)"),
    ("import regsearch\n@regsearch.register('Bad.Name')\nclass C(regsearch.Regularizer):\n"
     "    def search_space(self, trial):\n        return {}\n", r"a name is lower-case"),
    ("x = 1\n", r"registers no regularizer"),
])
def test_broken_plugin_files_fail_at_load_naming_the_file(registry, tmp_path, body, message):
    path = write(tmp_path, "broken.py", body)
    with pytest.raises(PluginError, match=message) as info:
        registry.load_file(path)
    assert "broken.py" in str(info.value) or "registered" not in message


def test_a_missing_plugin_file_is_named(registry, tmp_path):
    with pytest.raises(PluginError, match=r"plugin file .*nowhere\.py does not exist"):
        registry.load_file(tmp_path / "nowhere.py")


def test_register_outside_a_file_goes_to_the_default_registry():
    from regsearch import default_registry

    @register("test_only_identity")
    class Identity(Regularizer):
        """Does nothing."""

        def search_space(self, trial):
            return {}

    info = default_registry().get("test_only_identity")
    assert info.cls is Identity and info.source.startswith("module ")


def test_options_are_checked_against_the_constructor(registry):
    from regsearch import ConfigError

    with pytest.raises(ConfigError, match=r"regularizers\.l1\.strenght: unknown option \(did you mean 'strength'\?\)"):
        registry.create("l1", {"strenght": 1e-4})
    with pytest.raises(ConfigError, match=r"unknown regularizer 'dropuot' \(did you mean 'dropout'\?\)"):
        registry.create("dropuot", {})


def test_a_third_party_package_registers_through_the_entry_point_group(tmp_path, monkeypatch):
    """An installed distribution (a dist-info on sys.path) with an entry point in the group."""
    pkg = tmp_path / "site"
    (pkg / "thirdreg").mkdir(parents=True)
    (pkg / "thirdreg" / "__init__.py").write_text(textwrap.dedent("""
        import regsearch

        class Noise(regsearch.Regularizer):
            '''Gaussian noise, a third-party plugin.'''

            def search_space(self, trial):
                return {"sigma": trial.suggest_float("sigma", 0.0, 0.1)}
    """))
    info = pkg / "thirdreg-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdreg\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nnoise = thirdreg:Noise\n")
    monkeypatch.syspath_prepend(str(pkg))
    registry = RegularizerRegistry()
    registry.load_entry_points()
    assert registry.get("noise").source == "package thirdreg 1.2.3"
    # the variable that turns off autoloading keeps third-party plugins out, the built-ins in
    monkeypatch.setenv("REGSEARCH_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry = RegularizerRegistry()
    registry.load_entry_points()
    assert "noise" not in registry and "l1" in registry
