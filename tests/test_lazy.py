"""histobench.lazy: module classes built on first use, pickled by name, torch not imported by plugins."""

from __future__ import annotations

import pickle
import subprocess
import sys
import types

import pytest

from histobench.lazy import lazy_attributes, torch_class


@pytest.fixture
def fake_plugin_module():
    """A module ``fake_lazy_plugin`` defining a lazily built ``Doubler`` the way plugins do."""
    mod = types.ModuleType("fake_lazy_plugin")
    builds = []

    def _doubler_class() -> type:
        from torch import nn

        builds.append(1)

        class Doubler(nn.Module):
            def forward(self, x):
                return 2 * x

        return Doubler

    _doubler_class.__module__ = mod.__name__
    mod._doubler_class = torch_class(_doubler_class)
    mod.__getattr__ = lazy_attributes(mod.__name__, Doubler=mod._doubler_class)
    sys.modules[mod.__name__] = mod
    yield mod, builds
    del sys.modules[mod.__name__]


def test_class_is_built_once_and_named_as_a_top_level_class(fake_plugin_module):
    mod, builds = fake_plugin_module
    cls = mod._doubler_class()
    assert mod._doubler_class() is cls and mod.Doubler is cls and len(builds) == 1
    assert (cls.__module__, cls.__qualname__) == ("fake_lazy_plugin", "Doubler")
    with pytest.raises(AttributeError, match="fake_lazy_plugin.*no attribute 'Tripler'"):
        mod.Tripler


def test_instances_pickle_through_the_module_getattr(fake_plugin_module):
    import torch

    mod, _ = fake_plugin_module
    clone = pickle.loads(pickle.dumps(mod.Doubler()))
    assert type(clone) is mod.Doubler
    assert torch.equal(clone(torch.ones(3)), torch.full((3,), 2.0))


@pytest.mark.parametrize("module,cls", [("histobench_mil.abmil", "GatedAttentionMIL"),
                                        ("histobench_mil.mean_linear", "MeanPoolLinear"),
                                        ("histobench_timm.encoder", "TimmBackbone"),
                                        ("histobench_slpd.encoder", "HIPTViT4K")])
def test_plugin_modules_do_not_import_torch_until_their_class_is_wanted(module, cls):
    code = (f"import sys, importlib; m = importlib.import_module({module!r}); "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            f"c = getattr(m, {cls!r}); assert 'torch' in sys.modules; print(c.__module__, c.__qualname__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [module, cls]
