"""Registries keyed by name: a method is a function registered under its paper's name.

Each module that defines methods registers them on import; ``REGISTRIES`` imports those
modules on first use so that ``Registry.get`` always sees every method.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, modules: tuple[str, ...] = ()):
        self.kind = kind
        self._modules = modules  # modules whose import fills this registry
        self._items: dict[str, T] = {}
        self._meta: dict[str, dict] = {}
        self._loaded = False

    def register(self, name: str, **meta) -> Callable[[T], T]:
        """Register under ``name``; ``meta`` is what the trainer needs to know about the method
        (e.g. ``needs_data=True`` for a pruner scored on a data batch), read back with ``meta(name)``."""
        def deco(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            self._meta[name] = dict(meta)
            return obj

        return deco

    def unregister(self, name: str) -> None:
        """Remove an entry (tests that register a toy method clean up with this)."""
        self._items.pop(name, None)
        self._meta.pop(name, None)

    def meta(self, name: str, key: str | None = None) -> dict:
        self.check(key or self.kind, name)
        return self._meta[name]

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for mod in self._modules:
                importlib.import_module(mod)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def check(self, key: str, name: str) -> None:
        self._load()
        if name not in self._items:
            raise ValueError(f"{key}={name!r} is not a known {self.kind}; choose one of {', '.join(self.names())}")

    def get(self, name: str, key: str | None = None) -> T:
        self.check(key or self.kind, name)
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


DATASETS: Registry = Registry("dataset", ("sparse_core.data",))
MODELS: Registry = Registry("model", ("sparse_core.models", "sparse_core.vit"))
INITS: Registry = Registry("init", ("sparse_core.init",))
PRUNERS: Registry = Registry("pruner", ("sparse_core.pruners",))
SCOPES: Registry = Registry("scope", ("sparse_core.pruning",))
MASK_KINDS: Registry = Registry("mask kind", ("sparse_core.learned_mask",))
TRICKS: Registry = Registry("post-prune trick", ("sparse_core.post_prune",))

REGISTRIES: dict[str, Registry] = {
    "datasets": DATASETS,
    "models": MODELS,
    "inits": INITS,
    "pruners": PRUNERS,
    "scopes": SCOPES,
    "mask_kinds": MASK_KINDS,
    "tricks": TRICKS,
}
