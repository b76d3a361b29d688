"""Package attributes that load their module on first use (PEP 562), for cheap package imports.

Importing ``emflow.x.y`` runs every parent package's ``__init__`` first, in the driver and in
every Dask worker: a package that re-exports its submodules' names eagerly makes each of
those processes import them all. :func:`lazy_names` turns a package's re-exports into names
that load on first access instead.

A re-exported function may share its name with a submodule (``emflow.plan``, the function,
and ``emflow/plan.py``); the import system binds a submodule to its package's attribute when
it loads, so for those names the binding is skipped: the attribute stays the function and the
module stays in ``sys.modules`` (``from emflow.plan import ...`` works as ever).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class _LazyPackage(types.ModuleType):
    def __getattr__(self, name: str) -> Any:  # only when the attribute is not set yet
        where = self.__dict__.get("_LAZY_NAMES", {}).get(name)
        if where is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where), name)
        types.ModuleType.__setattr__(self, name, value)  # bound once: no second lookup
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in self.__dict__.get("_LAZY_NAMES", {}):
            return  # a submodule named like a re-exported object: keep the object
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted({*self.__dict__, *self.__dict__.get("_LAZY_NAMES", {})})


def lazy_names(package: str, names: dict[str, str]) -> None:
    """Make ``names`` (attribute -> the module defining it) attributes of ``package`` that
    import their module on first access. Call at the end of the package's ``__init__``."""
    module = sys.modules[package]
    module.__dict__.setdefault("_LAZY_NAMES", {}).update(names)
    for name in names:  # an attribute bound meanwhile (a submodule of that name) gives way
        if isinstance(module.__dict__.get(name), types.ModuleType):
            del module.__dict__[name]
    module.__class__ = _LazyPackage
