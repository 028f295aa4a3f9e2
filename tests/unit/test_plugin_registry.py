"""The registry: every plugin module imports, names are unique, declarations are consistent."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest

import worker.plugins
from shared.errors import UserInputError
from worker.plugins import NOT_PLUGINS, registry
from worker.plugins.base import Optimizer, OptimizeRequest, Param

PLUGIN_MODULES = [m.name for m in pkgutil.iter_modules(worker.plugins.__path__) if m.name not in NOT_PLUGINS]


@pytest.mark.parametrize("module", PLUGIN_MODULES)
def test_every_plugin_module_imports_and_registers_a_plugin(module):
    imported = importlib.import_module(f"worker.plugins.{module}")

    registered = [*registry.converters.values(), *registry.optimizers.values()]
    assert any(cls.__module__ == imported.__name__ for cls in registered)


def test_plugin_names_are_unique_across_converters_and_optimizers():
    converters = {cls.name: cls for cls in registry.converters.values()}
    optimizers = {cls.name: cls for cls in registry.optimizers.values()}

    assert len(converters) == len(registry.converters) and len(optimizers) == len(registry.optimizers)
    assert not set(converters) & set(optimizers)


def test_no_plugin_module_imports_another():
    for module in PLUGIN_MODULES:
        source = (Path(worker.plugins.__path__[0]) / f"{module}.py").read_text()
        for other in PLUGIN_MODULES:
            assert f"worker.plugins.{other} " not in source and f"worker.plugins.{other}\n" not in source, (
                f"{module} imports {other}")


@pytest.mark.parametrize("name", sorted(registry.optimizers))
def test_every_declared_default_validates_against_its_own_declaration(name):
    cls = registry.optimizers[name]

    for key, param in cls.params.items():
        assert param.check(param.default, name=key, where=name) == param.default
    assert cls.checked_params({}) == {key: param.default for key, param in cls.params.items()}


def test_prune_methods_and_text_samples_are_declared_where_the_schema_expects_them():
    methods = {m for cls in registry.converters.values() for m in cls.prune_methods}

    assert methods == {"layers", "heads", "ffn-neurons", "channels"}
    assert [n for n, cls in registry.converters.items() if cls.text_samples] == ["hf-transformers"]


def test_a_param_type_outside_the_supported_ones_is_refused_when_declared():
    with pytest.raises(TypeError, match="Param type"):
        Param(dict, {}, "not supported")


def test_optimize_receives_params_checked_and_completed_with_defaults(tmp_path):
    seen: list[dict] = []

    class Probe(Optimizer):  # no ``name``: not registered
        params = {"level": Param(int, 3, "how hard"), "ratio": Param(float, 0.5, "how much", min=0, max=1)}

        def optimize(self, request: OptimizeRequest) -> Path:
            seen.append(request.params)
            return request.model

    request = OptimizeRequest(model=tmp_path, workdir=tmp_path, samples={}, task=None, inputs=[], outputs=[],
                              params={"ratio": 1})
    Probe().optimize(request)

    assert seen == [{"level": 3, "ratio": 1.0}] and isinstance(seen[0]["ratio"], float)
    assert request.params == {"ratio": 1}  # the caller's request is left as it was


def test_optimize_refuses_bad_params_before_the_plugin_runs(tmp_path):
    class Probe(Optimizer):
        name = "probe-only-for-this-test"
        params = {"level": Param(int, 3, "how hard")}

        def optimize(self, request: OptimizeRequest) -> Path:
            raise AssertionError("must not run")

    try:
        request = OptimizeRequest(model=tmp_path, workdir=tmp_path, samples={}, task=None, inputs=[], outputs=[],
                                  params={"level": "high"})
        with pytest.raises(UserInputError, match="optimize variant probe-only-for-this-test: parameter level must"):
            Probe().optimize(request)
    finally:
        registry.optimizers.pop("probe-only-for-this-test", None)
