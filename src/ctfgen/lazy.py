"""A package's names, loaded from their modules on first use (PEP 562): importing the package imports none of
them, so that `import ctfgen.cli` (and `ctfgen --help`) needs no torch."""

from __future__ import annotations

import importlib


def lazy_names(package: dict, homes: dict[str, str]):
    """`__getattr__` and `__dir__` for the package whose globals are `package`, with its names in `homes`
    ({name: the module that defines it})."""

    def __getattr__(name: str):
        if name not in homes:
            raise AttributeError(f"module {package['__name__']!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(homes[name]), name)
        package[name] = value  # looked up once
        return value

    def __dir__() -> list[str]:
        return sorted(set(package) | set(homes))

    return __getattr__, __dir__
