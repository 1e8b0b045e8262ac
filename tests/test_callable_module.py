"""``fourbit._callable_module``: a module that is also callable as its function of the same name, so that
``fourbit.quantize(x, ...)``, ``fourbit.ptq(model, ...)``, ``fourbit.export(model, ...)`` and the modules'
other names (``fourbit.export.load_quantized``) all work."""

from __future__ import annotations

import importlib
import inspect
import sys
import textwrap
import types

import pytest
import torch

from fourbit._callable_module import CallableModule, make_callable


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A throwaway package laid out like fourbit: ``pkg/scale.py`` defines ``scale`` and ``Other`` and makes
    itself callable; ``pkg/__init__.py`` imports a name from it, then the module itself."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "scale.py").write_text(textwrap.dedent('''
        """Scaling, the module's own docstring."""
        from fourbit._callable_module import make_callable

        class Other:
            pass

        def scale(x, factor=2.0):
            return x * factor

        make_callable(__name__)
    '''))
    (tmp_path / "pkg" / "__init__.py").write_text("from .scale import Other\nfrom . import scale\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module("pkg")
    for name in [n for n in sys.modules if n == "pkg" or n.startswith("pkg.")]:
        del sys.modules[name]


def test_module_is_called_as_its_function_and_keeps_its_attributes(package):
    m = package.scale
    assert isinstance(m, types.ModuleType) and isinstance(m, CallableModule)
    assert m(3.0) == 6.0 and m(3.0, factor=3.0) == 9.0
    assert m.Other is package.Other and m.__doc__ == "Scaling, the module's own docstring."
    assert inspect.signature(m) == inspect.signature(m.scale)


def test_every_import_spelling_reaches_the_module(package):
    import pkg.scale as by_as  # reads the package attribute (the spelling a bound function broke)
    from pkg import scale as by_from
    from pkg.scale import scale as fn

    assert by_as is by_from is sys.modules["pkg.scale"] is package.scale
    assert fn(1.0) == 2.0 and by_as.Other is by_from.Other


def test_the_call_follows_a_patched_function(package, monkeypatch):
    monkeypatch.setattr(package.scale, "scale", lambda x: -x)
    assert package.scale(5.0) == -5.0


def test_a_module_without_its_function_is_refused(tmp_path, monkeypatch):
    (tmp_path / "nofn.py").write_text("from fourbit._callable_module import make_callable\nmake_callable(__name__)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TypeError, match="no function 'nofn'"):
        importlib.import_module("nofn")
    sys.modules.pop("nofn", None)
    with pytest.raises(KeyError):
        make_callable("not.imported")


@pytest.mark.parametrize("name, attr", [("quantize", "QuantizedTensor"), ("ptq", "QuantizedLinear"),
                                        ("export", "load_quantized")])  # fmt: skip
def test_fourbit_quantize_ptq_export_are_modules_and_functions(name, attr):
    import fourbit

    m = getattr(fourbit, name)
    assert m is sys.modules[f"fourbit.{name}"] and callable(m)
    assert getattr(m, attr) is getattr(importlib.import_module(f"fourbit.{name}"), attr)
    assert inspect.signature(m) == inspect.signature(getattr(m, name))


def test_fourbit_calls_through_the_modules(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from hf_models import tiny_llama

    import fourbit
    import fourbit.export as export_module

    q = fourbit.quantize(torch.randn(4, 32), "nvfp4")
    assert isinstance(q, fourbit.quantize.QuantizedTensor)
    model = fourbit.ptq(tiny_llama(), "nvfp4", progress=False)
    assert any(isinstance(m, fourbit.ptq.QuantizedLinear) for m in model.modules())
    out = fourbit.export(model, tmp_path / "ckpt")
    loaded = export_module.load_quantized(out)
    assert torch.equal(loaded.state_dict()["model.layers.0.mlp.up_proj.weight_data"],
                       model.state_dict()["model.layers.0.mlp.up_proj.weight_data"])  # fmt: skip
