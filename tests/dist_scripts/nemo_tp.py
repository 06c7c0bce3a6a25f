"""torchrun helper for tests/test_export.py (2 processes, gloo).

    python -m torch.distributed.run --standalone --nproc_per_node 2 nemo_tp.py DIR TP1.nemo TOKENIZER

1. Restores TP1.nemo (written at tensor-parallel size 1) at size 2 and checks the gathered
   logits against DIR/ref.pt within 1e-5 relative.
2. Builds a random model at size 2 and writes DIR/tp2_dist.nemo (dist weights; restored
   here at size 2, every shard must be bit-identical), a training checkpoint DIR/tp2_ckpt/
   and its logits DIR/tp2_logits.pt for the test to restore at size 1.
"""

from __future__ import annotations

import os
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from retro_toolkit.checkpoint import nemo  # noqa: E402
from retro_toolkit.checkpoint.export import write_model  # noqa: E402
from retro_toolkit.collections.retro import checkpointing as ckpt  # noqa: E402
from retro_toolkit.collections.retro import build_model, config_from_model_section, initialize  # noqa: E402
from retro_toolkit.core import files  # noqa: E402


def main(folder: str, tp1_package: str, tokenizer_file: str) -> int:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    ref = torch.load(os.path.join(folder, "ref.pt"), weights_only=True)
    pkg = nemo.restore(tp1_package, tensor_model_parallel_size=2)
    with torch.no_grad():
        got = pkg.model(ref["tokens"], ref["neighbors"], runtime_gather_output=True)
    rel = ((got - ref["logits"]).abs().max() / ref["logits"].abs().max()).item()
    if rank == 0:
        print(f"tp1 package at tp=2: max relative difference {rel:.3e}", flush=True)
    if rel > 1e-5:
        return 1

    section = {**pkg.section, "tensor_model_parallel_size": 2}
    initialize(2, seed=11)
    cfg, args = config_from_model_section(section, neighbor_pad_id=0)
    model = build_model(cfg, args).eval()
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard values
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        # Replicated tensors must agree across ranks: take rank 0's.
        for _, p in model.named_parameters():
            if not getattr(p, "tensor_model_parallel", False):
                torch.distributed.broadcast(p.data, 0)
        logits = model(ref["tokens"], ref["neighbors"], runtime_gather_output=True)
    write_model(model, section, tokenizer_file, os.path.join(folder, "tp2_dist.nemo"), pkg.retrieval, "dist")
    ckpt.save(os.path.join(folder, "tp2_ckpt"), 1, model, None, None,
              {"model_section": section, "tokenizer_sha256": files.sha256_file(tokenizer_file)})
    # The package restored at size 2 holds exactly this rank's shards again.
    back = nemo.restore(os.path.join(folder, "tp2_dist.nemo"), tensor_model_parallel_size=2).model.state_dict()
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    if not all(torch.equal(v, back[k]) for k, v in own.items()):
        print(f"rank {rank}: tp2 package restored at tp=2 differs from the shards it was written from", flush=True)
        return 1
    if rank == 0:
        print("tp2 package restored at tp=2: every shard bit-identical", flush=True)
        torch.save(logits, os.path.join(folder, "tp2_logits.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
