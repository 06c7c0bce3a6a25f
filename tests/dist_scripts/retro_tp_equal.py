"""torchrun helper: logits at tensor-parallel size WORLD_SIZE equal the TP=1 reference.

    python -m torch.distributed.run --standalone --nproc_per_node 2 retro_tp_equal.py REF.pt

REF.pt (written by tests/test_retro_model_tp.py) holds the model section, the TP=1 state
dict, inputs and logits. Exit code 0 when every rank's gathered logits match within 1e-5
relative; rank 0 prints the measured difference.
"""

from __future__ import annotations

import os
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from retro_toolkit.collections.retro import build_model, config_from_model_section, initialize  # noqa: E402
from retro_toolkit.collections.retro.full_state_dict import load_full_state_dict  # noqa: E402


def main(ref_path: str) -> int:
    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    initialize(world, seed=3)
    ref = torch.load(ref_path, weights_only=True)
    section = {**ref["section"], "tensor_model_parallel_size": world}
    cfg, args = config_from_model_section(section, vocab_size=ref["vocab_size"])
    model = build_model(cfg, args).eval()
    load_full_state_dict(model, ref["state_dict"])
    with torch.no_grad():
        logits = model(ref["tokens"], ref["neighbors"], runtime_gather_output=True)
        gpt = model(ref["tokens"], None, runtime_gather_output=True)
    rel = []
    for got, want in ((logits, ref["logits"]), (gpt, ref["logits_no_retrieval"])):
        rel.append(((got - want).abs().max() / want.abs().max()).item())
    if int(os.environ["RANK"]) == 0:
        print(f"tp={world} max relative difference: retro {rel[0]:.3e}, no retrieval {rel[1]:.3e}", flush=True)
    torch.distributed.destroy_process_group()
    return 0 if max(rel) <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
