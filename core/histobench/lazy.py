"""``nn.Module`` classes in plugins that do not import torch when the plugin is imported.

A module class can only be defined once torch is imported. Defined inside ``build``, it is a new class on
every call and does not pickle (DataLoader workers, ``torch.save`` of a whole module). Instead, a plugin
writes a factory that imports torch and returns the class, decorates it with :func:`torch_class`, and
serves it under its name with :func:`lazy_attributes`::

    @torch_class
    def _net_class():
        from torch import nn

        class MaxPool(nn.Module):
            ...

        return MaxPool

    __getattr__ = lazy_attributes(__name__, MaxPool=_net_class)

The class is built once, on first use; it reports the plugin module as its ``__module__`` and its own name
as its ``__qualname__``, and the module-level ``__getattr__`` (PEP 562) lets ``pickle`` find it there.
"""

from __future__ import annotations

import functools
from typing import Any, Callable


def torch_class(factory: Callable[[], type]) -> Callable[[], type]:
    """A cached getter for the class that ``factory()`` defines, named as a top-level class of its module."""

    @functools.cache
    def get() -> type:
        cls = factory()
        cls.__module__ = factory.__module__
        cls.__qualname__ = cls.__name__
        return cls

    functools.update_wrapper(get, factory)
    return get


def lazy_attributes(module_name: str, **getters: Callable[[], Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) that serves ``name`` as ``getters[name]()``."""

    def __getattr__(name: str) -> Any:
        if name in getters:
            return getters[name]()
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    return __getattr__
