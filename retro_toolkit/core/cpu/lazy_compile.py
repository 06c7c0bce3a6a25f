"""Importing megatron-core without importing torch's compiler.

megatron-core wraps its fused kernels (bias-GeLU, bias-dropout-add, SwiGLU...) in torch.compile
as it is imported, and torch.compile imports TorchDynamo and Inductor at that call: about 2 s
of every process that imports megatron-core (each rank of each model stage, `retro-run
generate`, `serve`), although only a GPU run with the fusions on calls those kernels
(collections/retro/config.cpu_flags turns them off without CUDA). `install` makes the next
import of megatron-core wrap each kernel in a stub instead, which calls torch.compile at the
kernel's first call: the compiled kernel and its compilation time are torch.compile's, as
before; torch.compile itself is restored once the import ends.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
from typing import Any, Callable

_TARGET = "megatron.core"


def install() -> None:
    """Defer megatron-core's torch.compile calls, if it is not imported yet (once per process)."""
    if _TARGET in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())


def deferred(compile_fn: Callable) -> Callable:
    """torch.compile's signature; the function it returns compiles on its first call."""

    def compile(model: Any = None, **kwargs: Any) -> Any:
        if model is None:  # used as @torch.compile(...)
            return lambda fn: compile(fn, **kwargs)
        compiled = None

        @functools.wraps(model)
        def first_call_compiles(*args: Any, **kw: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                compiled = compile_fn(model, **kwargs)
            return compiled(*args, **kw)

        return first_call_compiles

    return compile


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


class _Loader(importlib.abc.Loader):
    """The package's own loader, with torch.compile deferred while its module runs."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> Any:  # resource readers and the like: the real loader's
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        import torch

        real = torch.compile
        torch.compile = deferred(real)
        try:
            self._loader.exec_module(module)
        finally:
            torch.compile = real
