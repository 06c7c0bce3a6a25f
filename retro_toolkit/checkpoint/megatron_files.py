"""Finding and loading the files of a Megatron-LM checkpoint folder.

The folder holds latest_checkpointed_iteration.txt, naming release/ or iter_NNNNNNN/; a
legacy iteration folder holds mp_rank_<TT>/model_optim_rng.pt, one per tensor-parallel
rank. Those files (and a torch_dist folder's common.pt) are pickles: they are loaded with
torch.load(weights_only=True) unless the caller trusts them, with Megatron-LM's enums
loading as `UpstreamEnum` either way.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
import types
from pathlib import Path
from typing import Any, Iterator

from retro_toolkit.errors import UserError

ITERATION_FILE = "latest_checkpointed_iteration.txt"
SHARD_FILE = "model_optim_rng.pt"


def iteration_folder(folder: str | os.PathLike) -> Path:
    """The release/ or iter_NNNNNNN/ folder that latest_checkpointed_iteration.txt names."""
    folder = Path(folder)
    pointer = folder / ITERATION_FILE
    if not pointer.is_file():
        raise UserError(f"{folder} has no {ITERATION_FILE}: give the folder of a Megatron-LM checkpoint (the one "
                        "holding that file and release/ or iter_NNNNNNN/).")
    tag = pointer.read_text().strip()
    sub = folder / ("release" if tag == "release" else f"iter_{int(tag):07d}" if tag.isdigit() else tag)
    if not sub.is_dir():
        raise UserError(f"{pointer} says {tag!r} but {sub} does not exist.")
    return sub


def shard_files(sub: Path) -> list[Path]:
    """The model_optim_rng.pt of every tensor-parallel rank of an iteration folder, in rank order."""
    ranks = sorted(p for p in sub.iterdir() if p.is_dir() and p.name.startswith("mp_rank_"))
    if not ranks:
        raise UserError(f"{sub} holds no mp_rank_NN folders.")
    if any(re.fullmatch(r"mp_rank_\d+_\d+", p.name) for p in ranks):
        raise UserError(f"{sub} is split over pipeline stages (mp_rank_TT_PPP folders); only tensor-parallel "
                        "checkpoints (mp_rank_TT) are supported. Merge the pipeline stages with Megatron-LM's "
                        "checkpoint converter first.")
    want = [sub / f"mp_rank_{i:02d}" for i in range(len(ranks))]
    if ranks != want:
        raise UserError(f"{sub}: tensor-parallel folders {[p.name for p in ranks]} are not mp_rank_00.."
                        f"mp_rank_{len(ranks) - 1:02d}.")
    files = [p / SHARD_FILE for p in want]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UserError(f"missing shard files: {', '.join(missing)}.")
    return files


class UpstreamEnum:
    """What an enum member of Megatron-LM's args (args.model_type = ModelType.retro_decoder...)
    loads as: its value only. The enums changed between releases (megatron-core 0.16 has no
    ModelType 4), and nothing here reads them."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"UpstreamEnum({self.value!r})"


UPSTREAM_ENUMS = ("megatron.core.enums.ModelType", "megatron.core.transformer.enums.AttnBackend",
                  "megatron.core.transformer.enums.AttnMaskType", "megatron.model.enums.AttnMaskType",
                  "megatron.model.enums.LayerType", "megatron.model.enums.AttnType")


class _UpstreamUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return UpstreamEnum if f"{module}.{name}" in UPSTREAM_ENUMS else super().find_class(module, name)


# torch.load(pickle_module=...) for full pickle: the upstream enums load as UpstreamEnum.
_upstream_pickle = types.SimpleNamespace(**{**vars(pickle), "Unpickler": _UpstreamUnpickler})


def _name(g: Any) -> str:
    return g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"


@contextlib.contextmanager
def _upstream_safe_globals(allowed: list) -> Iterator[None]:
    """weights_only loading with `allowed` added and, while it runs, without the real classes of
    the names UpstreamEnum stands for (megatron-core registers its own enums, which would win)."""
    import torch

    before = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals([g for g in before if _name(g) not in UPSTREAM_ENUMS] + allowed)
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def load_shard(path: Path, trust: bool) -> dict[str, Any]:
    """One checkpoint file's dict: weights_only unless `trust` (then full pickle)."""
    import torch

    if trust:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_upstream_pickle)
    allowed = [argparse.Namespace] + [(UpstreamEnum, name) for name in UPSTREAM_ENUMS]
    try:
        with _upstream_safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it pickles {m.group(1)}" if m else (str(e).strip().splitlines() or ["unknown"])[0]
        raise UserError(f"{path} needs full pickle to load ({what}): weights_only loading rebuilds only tensors, "
                        "plain containers, numpy arrays and the training args. If you trust the file's source, "
                        "rerun with --trust-checkpoint (full pickle can run code from the file).") from None
