"""torchrun helper: megatron-core's own GPTModel at tensor-parallel size WORLD_SIZE, saved by its
own dist_checkpointing as a Megatron-LM torch_dist checkpoint.

    python -m torch.distributed.run --standalone --nproc_per_node 2 gpt_dist_tp.py REF.pt OUT_DIR

REF.pt (written by tests/test_megatron_import.py with `build(1)` below) holds the TP=1 state
dict and the tokens. Every rank loads its slices, the sharded model's (gathered) logits go to
OUT_DIR/logits.pt, and the checkpoint to OUT_DIR/iter_0000001 with Megatron-LM's args.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402

ARGS = dict(num_layers=2, hidden_size=32, num_attention_heads=4, group_query_attention=True, num_query_groups=2,
            ffn_hidden_size=64, seq_length=64, padded_vocab_size=96, swiglu=True, normalization="RMSNorm",
            add_bias_linear=False, position_embedding_type="rope", rotary_percent=1.0, norm_epsilon=1e-5,
            untie_embeddings_and_output_weights=True, retro_add_retriever=False, pipeline_model_parallel_size=1)


def build(tp: int):
    """megatron-core's GPTModel (local spec) of ARGS's shape at tensor-parallel size `tp`."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from retro_toolkit.collections.retro import initialize
    from retro_toolkit.collections.retro.config import cpu_flags

    initialize(tp, seed=3)
    a = ARGS
    cfg = TransformerConfig(num_layers=a["num_layers"], hidden_size=a["hidden_size"],
                            num_attention_heads=a["num_attention_heads"], num_query_groups=a["num_query_groups"],
                            ffn_hidden_size=a["ffn_hidden_size"], hidden_dropout=0.0, attention_dropout=0.0,
                            normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
                            add_bias_linear=False, tensor_model_parallel_size=tp, **cpu_flags())
    return GPTModel(cfg, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=a["padded_vocab_size"],
                    max_sequence_length=a["seq_length"], position_embedding_type="rope", parallel_output=False,
                    share_embeddings_and_output_weights=False).eval()


def main(ref_path: str, out: str) -> int:
    from megatron.core import dist_checkpointing

    from retro_toolkit.collections.retro.full_state_dict import load_full_state_dict

    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    ref = torch.load(ref_path, weights_only=True)
    model = build(world)
    load_full_state_dict(model, ref["state_dict"])
    tokens = ref["tokens"]
    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1), None)
    sd = model.sharded_state_dict()
    sd["args"] = argparse.Namespace(**ARGS, tensor_model_parallel_size=world)
    (Path(out) / "iter_0000001").mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(sd, str(Path(out) / "iter_0000001"))
    if int(os.environ["RANK"]) == 0:
        (Path(out) / "latest_checkpointed_iteration.txt").write_text("1")
        torch.save(logits, Path(out) / "logits.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
