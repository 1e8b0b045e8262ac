"""Modules that can be called as their own main function: ``fourbit.quantize(x, "nvfp4")`` next to
``fourbit.quantize.QuantizedTensor``.

Three modules are named after the one function each exists for: ``fourbit.quantize``, ``fourbit.ptq`` and
``fourbit.export``. The package re-exports each function under its module's name, and a name in the
package can hold only one object: with the function bound there, ``fourbit.export.load_quantized`` is an
AttributeError, and so is ``import fourbit.export as e; e.load_quantized`` (``import a.b as c`` reads the
package attribute). ``from fourbit.export import load_quantized`` works (it goes through ``sys.modules``),
which is why this went unnoticed.

The fix keeps both spellings: the package binds the module, and the module's class becomes
``CallableModule``, whose ``__call__`` forwards to the module's function of the same name. So
``fourbit.export(model, "out/")`` calls ``fourbit.export.export`` and ``fourbit.export.load_quantized`` is the
module's attribute. The function is looked up when called, so patching ``fourbit.quantize.quantize``
patches ``fourbit.quantize(...)`` too; ``inspect.signature(fourbit.quantize)`` is the function's.

A module opts in with one line at its end (after the function is defined)::

    make_callable(__name__)  # fourbit.<name>(...) calls <name>(...)

and the package imports the module itself (``from . import export``), not ``from .export import export``,
which would bind the function over it again. Setting a module's ``__class__`` to a ``ModuleType`` subclass
is supported since Python 3.5, for this kind of use (the Python reference, "Customizing module attribute
access", shows ``sys.modules[__name__].__class__ = ...``).
"""

from __future__ import annotations

import inspect
import sys
import types

__all__ = ["CallableModule", "make_callable"]


def _function_name(module: types.ModuleType) -> str:
    return module.__name__.rpartition(".")[2]


class CallableModule(types.ModuleType):
    """A module whose call is its function of the same name (``fourbit.quantize(...)`` is
    ``fourbit.quantize.quantize(...)``)."""

    def __call__(self, *args, **kwargs):
        return getattr(self, _function_name(self))(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(getattr(self, _function_name(self)))


def make_callable(module_name: str) -> None:
    """Make the module ``module_name`` (already in ``sys.modules``: pass ``__name__``) callable as its function
    of the same name, which must be defined by now."""
    module = sys.modules[module_name]
    name = _function_name(module)
    if not callable(getattr(module, name, None)):
        raise TypeError(f"make_callable: module {module_name!r} has no function {name!r} to forward calls to")
    module.__class__ = CallableModule
