"""Package attributes resolved on first use (PEP 562), so importing a package stays cheap."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_attributes(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module-level __getattr__ that imports `package.<exports[name]>` and returns its `name` on first use."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    return __getattr__
