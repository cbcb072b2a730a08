"""Run Python as on a machine where torch is not installed (``pip install llama-swarm``).

    python tests/without_torch.py -m MODULE [ARGS...]   run a module as ``python -m`` would
    python tests/without_torch.py -c CODE [ARGS...]     run a piece of code

Every finder on ``sys.meta_path`` is wrapped so that it does not find ``torch`` or its
submodules: ``import torch`` raises ``ModuleNotFoundError`` and
``importlib.util.find_spec("torch")`` is None, as without the package (transformers
checks the latter and then runs torch-free). Raising from a finder instead would
break such checks, which a real torch-less machine does not.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import runpy
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

__all__ = ["hide_torch"]


def _hidden(name: str) -> bool:
    return name == "torch" or name.startswith("torch.")


class _HideTorch(importlib.abc.MetaPathFinder):
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if _hidden(fullname):
            return None
        find = getattr(self._inner, "find_spec", None)
        return None if find is None else find(fullname, path, target)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:  # find_distributions, invalidate_caches, ...
        return getattr(self._inner, name)


def hide_torch() -> None:
    """From now on this process cannot import torch (it must not have done so yet)."""
    loaded = [name for name in sys.modules if _hidden(name)]
    assert not loaded, f"torch is already imported: {loaded[:3]}"
    sys.meta_path[:] = [f if isinstance(f, _HideTorch) else _HideTorch(f) for f in sys.meta_path]


if __name__ == "__main__":
    hide_torch()
    if len(sys.argv) < 3 or sys.argv[1] not in ("-m", "-c"):
        sys.exit(__doc__)
    flag, target = sys.argv[1], sys.argv[2]
    if flag == "-m":
        sys.argv = [target, *sys.argv[3:]]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.argv = ["-c", *sys.argv[3:]]
        exec(compile(target, "<without_torch -c>", "exec"), {"__name__": "__main__"})
