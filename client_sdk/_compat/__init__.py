"""``client_sdk``: the SDK's import name before 0.2, kept as a deprecated alias.

The SDK is :mod:`tessera_mq.client` (docs/deploy.md, "Installed modules"). This package is
installed as the top-level ``client_sdk`` so that code written against the old name keeps
working for one minor release: ``import client_sdk`` gives the very module object
``tessera_mq.client`` (same classes, so ``isinstance`` and ``except`` clauses agree), and
``import client_sdk.sync`` gives ``tessera_mq.client.sync``. Importing it emits a
:class:`DeprecationWarning`.

The submodule alias is an import finder for names under ``client_sdk.`` only; it changes
nothing for any other module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

_OLD = "client_sdk"
_NEW = "tessera_mq.client"


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self._target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self._target)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing: the target module is already executed under its own name."""


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(_OLD + "."):
            return None
        new = _NEW + fullname[len(_OLD) :]
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


warnings.warn(
    "the SDK's module is now tessera_mq.client; `client_sdk` is a deprecated alias "
    "(import tessera_mq.client as tessera)",
    DeprecationWarning,
    stacklevel=2,
)

if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())
sys.modules[_OLD] = importlib.import_module(_NEW)
