"""Lazy package exports: public names imported from their modules on first access.

Keeps ``import handsoff`` and ``handsoff --help`` from importing torch, h5py and friends.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Sequence

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str],
                 public: Sequence[str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for a package whose public names live in submodules.

    Args:
        package: the package's ``__name__`` (for the AttributeError message).
        exports: lazily imported public name -> module that defines it.
        public: the package's ``__all__`` (what ``dir()`` lists).
    """
    names = list(public)

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return names

    return __getattr__, __dir__
