"""Saved state dicts read one tensor at a time, so loading one never holds the whole file.

torch.load(mmap=True) maps the file instead of reading it, but every page a copy touches
stays in the process (as file-backed RSS) until the mapping goes. Loading a 2 GB fp32 file
into a 1 GB bf16 model would then peak at 3 GB. `MappedWeights.release(name)` hands a
tensor's pages back to the OS once it has been copied (madvise DONTNEED: the file is
unchanged, a later read maps it in again), so the peak is the model plus one tensor.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

_MADV_DONTNEED = 4  # Linux; elsewhere release() does nothing (pages go when the mapping does)
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def dtype_of(tensors: Mapping[str, Any]) -> torch.dtype:
    """The dtype most of a state dict's floating-point tensors have (what its model trained in)."""
    if isinstance(tensors, LazyWeights) and type(tensors).dtype is not LazyWeights.dtype:
        return tensors.dtype()  # known without reading the tensors
    counts = Counter(t.dtype for t in tensors.values() if isinstance(t, torch.Tensor) and t.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float32


def safetensors_dtype(dtypes: Iterable[str]) -> torch.dtype:
    """The floating-point dtype most of a safetensors file's tensors have, from their dtype names."""
    found = Counter(dtypes)
    return next((SAFETENSORS_DTYPES[d] for d, _ in found.most_common() if d in SAFETENSORS_DTYPES), torch.float32)


class LazyWeights(Mapping):
    """name -> tensor, each tensor read when it is asked for; `release(name)` after its copy."""

    def __init__(self, names: list[str]):
        self.names = names
        self._known = set(names)

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def release(self, name: str) -> None:
        """Done with this tensor: what it holds in memory may go."""

    def dtype(self) -> torch.dtype:
        return dtype_of(self)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        return self.read(name)

    def __contains__(self, name: object) -> bool:
        return name in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class DeferredWeights(LazyWeights):
    """name -> a function making that tensor (read from a file, or fused from several), called
    when the tensor is asked for: loading holds the model plus one tensor, never the checkpoint."""

    def __init__(self, makers: dict[str, Callable[[], torch.Tensor]], dtype: torch.dtype):
        self._makers, self._dtype = makers, dtype
        super().__init__(list(makers))

    def read(self, name: str) -> torch.Tensor:
        return self._makers[name]()

    def dtype(self) -> torch.dtype:
        return self._dtype


class MappedWeights(LazyWeights):
    """A torch.save'd dict of tensors (weights_only), memory-mapped."""

    def __init__(self, path: str | os.PathLike):
        self._tensors: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        super().__init__(list(self._tensors))

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def release(self, name: str) -> None:
        """Give back the memory pages lying wholly inside this tensor's bytes in the file."""
        t = self._tensors[name]
        if not sys.platform.startswith("linux") or t.numel() == 0 or not t.is_contiguous():
            return
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        page = mmap.PAGESIZE
        first, last = -(-start // page) * page, end // page * page
        if last > first:
            _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), ctypes.c_int(_MADV_DONTNEED))


class SafetensorsWeights(LazyWeights):
    """An open safetensors file (safe_open(..., framework="pt")); each tensor is read as a copy."""

    def __init__(self, handle):
        self._f = handle
        super().__init__(list(handle.keys()))

    def read(self, name: str) -> torch.Tensor:
        return self._f.get_tensor(name)

    def dtype(self) -> torch.dtype:
        return safetensors_dtype(self._f.get_slice(n).get_dtype() for n in self.names)


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return _LIBC
