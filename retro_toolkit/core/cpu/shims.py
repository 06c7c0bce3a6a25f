"""Stand-ins that let megatron-core code written for CUDA run on the CPU.

The patches in this package hand these to megatron-core modules: a view of torch whose
device answers are the CPU's, and a context in which CPU parameters carry CUDA type names.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


def torch_view() -> Any:
    """A view of torch for one megatron module: torch.cuda.current_device() answers "cpu" and
    tensor factories called with device="cuda" build on the CPU; all else is torch."""
    import functools
    import types

    import torch

    class _Cuda(types.SimpleNamespace):
        def __getattr__(self, name: str) -> Any:
            return getattr(torch.cuda, name)

        @staticmethod
        def current_device() -> str:
            return "cpu"

    def on_cpu(factory):
        @functools.wraps(factory)
        def build(*args, **kwargs):
            device = kwargs.get("device")
            if device is not None and str(device).startswith("cuda"):
                kwargs["device"] = "cpu"
            return factory(*args, **kwargs)

        return build

    class _Torch(types.ModuleType):
        cuda = _Cuda()
        zeros = staticmethod(on_cpu(torch.zeros))
        ones = staticmethod(on_cpu(torch.ones))
        empty = staticmethod(on_cpu(torch.empty))
        full = staticmethod(on_cpu(torch.full))
        tensor = staticmethod(on_cpu(torch.tensor))

        def __getattr__(self, name: str) -> Any:
            return getattr(torch, name)

    return _Torch("torch")


@contextlib.contextmanager
def cuda_type_names() -> Iterator[None]:
    """While inside, a CPU parameter's type() answers with the CUDA name of its dtype."""
    import torch

    own = torch.nn.Parameter.__dict__.get("type")

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not self.is_cuda:
            return torch.Tensor.type(self).replace("torch.", "torch.cuda.", 1)
        return torch.Tensor.type(self, dtype, non_blocking, **kwargs)

    torch.nn.Parameter.type = type_
    try:
        yield
    finally:
        if own is None:
            del torch.nn.Parameter.type
        else:
            torch.nn.Parameter.type = own
