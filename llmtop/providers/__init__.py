"""Backend adapters, one module per protocol; each registers itself, so adding one is one new file."""

from __future__ import annotations

import importlib
import pkgutil

from llmtop.providers.base import Adapter

ADAPTERS: dict[str, type[Adapter]] = {}
_all_imported = False


def register(cls: type[Adapter]) -> type[Adapter]:
    ADAPTERS[cls.provider] = cls
    return cls


def adapter_class(provider: str) -> type[Adapter]:
    global _all_imported
    if not _all_imported:
        for module in pkgutil.iter_modules(__path__):
            if module.name != "base":
                importlib.import_module(f"{__name__}.{module.name}")
        _all_imported = True
    return ADAPTERS[provider]
