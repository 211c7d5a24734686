"""Modules imported on first use, so that `trl-dpo-plus --help` and `trl-dpo-plus losses` answer without loading
torch (about 2 s on a small CPU machine).

The loss modules write `from ._lazy import torch, F` where they would write `import torch` and
`import torch.nn.functional as F`; every use inside a loss is an attribute access, which imports the real module once.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule:
    """A stand-in for a module that imports it at the first attribute access."""

    def __init__(self, name: str):
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str):
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}{'' if self._module is None else ' (imported)'}>"


torch = LazyModule("torch")
F = LazyModule("torch.nn.functional")
