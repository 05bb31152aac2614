"""Package names resolved on first use (PEP 562), so that importing a package does not import
all of it: `import cellfm` stays free of torch, and a low module (the corpus readers) can use
`cellfm.contract.counts` without loading the rest of the contract."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """The module `__getattr__` of `package`: name -> the attribute of the module `exports[name]`."""

    def __getattr__(name: str) -> object:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
