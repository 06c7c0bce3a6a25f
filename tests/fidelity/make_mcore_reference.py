"""Reference logits from megatron-core 0.15.3's RetroModel, the last upstream Retro.

usage (its own virtual environment, CPU; nothing else of this project is imported):
    python -m venv /tmp/mcore015 && /tmp/mcore015/bin/pip install torch==2.13.0 megatron-core==0.15.3 psutil
    /tmp/mcore015/bin/python tests/fidelity/make_mcore_reference.py --out tests/fidelity/data
    /tmp/mcore015/bin/torchrun --nproc-per-node 2 tests/fidelity/make_mcore_reference.py --out tests/fidelity/data

For each config in CONFIGS it builds megatron-core's RetroModel from its own local spec
(get_retro_decoder_block_spec, use_transformer_engine=False), gives every parameter seeded
random values (biases and norm weights included, so a mis-mapped tensor shows), runs one
forward pass in float32 on random tokens and random neighbours, and saves
<name>.pt = {"config", "state_dict" (megatron-core names), "tokens", "neighbor_tokens"
[b, l, k, r], "logits" [b, n, vocab], "versions"}. tests/test_fidelity.py loads each file
into retro_toolkit's model through the importer's name mapping and compares logits.
DIST_CONFIG is also saved as a Megatron-LM training checkpoint in torch_dist format
(<name>_torch_dist/), the input of `retro-run import-megatron`. Under torchrun with N ranks
the script writes only DIST_CONFIG at tensor-parallel size N (<name>_tpN_torch_dist/, each
rank's shards randomised apart) and the logits that sharded model computes (<name>_tpN.pt).

Only device placement is patched (megatron-core 0.15.3 asks torch.cuda for a device in its
rotary embedding and attention scratch buffer, and for an RNG tracker around eval-mode
dropout); no layer math is touched. Its local spec builds torch's LayerNorm, which refuses
zero-centred gamma: for the LayerNorm-1p config the reference runs plain LayerNorm with
weight w and the file stores w - 1, which is what a 1p norm (gamma + 1) computes with.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

VOCAB, BATCH = 96, 2

# Three shapes: InstructRetro's (RoPE on half of each head, SwiGLU, no biases, untied
# embeddings, LayerNorm 1p), a 9-layer one with two CCA layers, and the classic GPT-2 style
# (GELU, biases, tied embeddings, learned absolute positions).
CONFIGS = {
    "instructretro": dict(num_layers=6, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                          swiglu=True, add_bias_linear=False, untie=True, layernorm_1p=True,
                          position="rope", rotary_percent=0.5, chunk=8, seq=32, k=2, retrieved_chunks=2),
    "nine_layers": dict(num_layers=9, hidden_size=32, num_attention_heads=2, ffn_hidden_size=48,
                        swiglu=True, add_bias_linear=True, untie=True, layernorm_1p=False,
                        position="rope", rotary_percent=1.0, chunk=4, seq=24, k=3, retrieved_chunks=2),
    "classic": dict(num_layers=6, hidden_size=32, num_attention_heads=4, ffn_hidden_size=128,
                    swiglu=False, add_bias_linear=True, untie=False, layernorm_1p=False,
                    position="learned_absolute", rotary_percent=1.0, chunk=8, seq=32, k=2, retrieved_chunks=2),
}


def _cpu_only() -> None:
    import megatron.core.models.retro.config as retro_config
    from megatron.core import tensor_parallel

    torch.cuda.current_device = lambda: "cpu"  # rotary inv_freq, GlobalMemoryBuffer scratch

    class _NoTracker:
        def fork(self, *args, **kwargs):
            return contextlib.nullcontext()

    tensor_parallel.get_cuda_rng_tracker = lambda *a, **k: _NoTracker()
    # RetroConfig asks for Transformer Engine's version (none here) to check its env vars.
    retro_config.is_te_min_version = lambda *a, **k: False


def _init_parallel() -> None:
    import torch.distributed as td
    from megatron.core import parallel_state

    if not td.is_initialized():
        if "WORLD_SIZE" in os.environ:  # torchrun
            td.init_process_group("gloo")
        else:
            store = tempfile.mktemp(prefix="mcore_ref_")
            td.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(td.get_world_size(), 1)


def build(c: dict, tp: int = 1):
    from megatron.core.models.retro import RetroConfig, get_retro_decoder_block_spec
    from megatron.core.models.retro.model import RetroModel

    config = RetroConfig(
        num_layers=c["num_layers"], hidden_size=c["hidden_size"], num_attention_heads=c["num_attention_heads"],
        ffn_hidden_size=c["ffn_hidden_size"], hidden_dropout=0.0, attention_dropout=0.0,
        retro_encoder_hidden_dropout=0.0, retro_encoder_attention_dropout=0.0,
        gated_linear_unit=c["swiglu"], activation_func=F.silu if c["swiglu"] else F.gelu,
        add_bias_linear=c["add_bias_linear"], normalization="LayerNorm", layernorm_epsilon=1e-5,
        retro_chunk_length=c["chunk"], retro_num_neighbors=c["k"],
        retro_num_retrieved_chunks=c["retrieved_chunks"], retro_encoder_num_layers=2,
        retro_split_preprocessing="98,2,0", use_cpu_initialization=True, bias_dropout_fusion=False,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False, apply_rope_fusion=False, init_method_std=0.02,
        tensor_model_parallel_size=tp,
    )
    spec = get_retro_decoder_block_spec(config, use_transformer_engine=False)
    model = RetroModel(
        config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=c["seq"],
        share_embeddings_and_output_weights=not c["untie"], position_embedding_type=c["position"],
        rotary_percent=c["rotary_percent"], parallel_output=False,
    )
    return model.eval()


def randomise(model, seed: int, rank: int = 0) -> None:
    """Seeded values for every parameter; a tensor-parallel shard also draws from its rank, a
    replicated tensor (norms, row-parallel biases) is the same on every rank."""
    shared = torch.Generator().manual_seed(seed)
    own = torch.Generator().manual_seed(seed + 1000 * (rank + 1))
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.1 if name.endswith("bias") else (0.2 if p.dim() == 1 else 0.08)
            mean = 1.0 if p.dim() == 1 and "norm" in name and name.endswith("weight") else 0.0
            g = own if getattr(p, "tensor_model_parallel", False) else shared
            p.copy_(mean + std * torch.randn(p.shape, generator=g))


def forward(model, c: dict, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    n, m, k = c["seq"], c["chunk"], c["k"]
    r = c["retrieved_chunks"] * m
    tokens = torch.randint(0, VOCAB, (BATCH, n), generator=g)
    neighbors = torch.randint(0, VOCAB, (BATCH, n // m, k, r), generator=g)
    position_ids = torch.arange(n).expand(BATCH, n)
    causal = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)[None, None]
    context_ids = neighbors.reshape(-1, r)  # [b*l*k, r], Megatron-LM's pretrain_retro order
    context_positions = torch.arange(r).expand(context_ids.shape[0], r)
    with torch.no_grad():
        logits = model(input_ids=tokens, position_ids=position_ids, attention_mask=causal,
                       context_input_ids=context_ids, context_position_ids=context_positions, context_mask=None)
    return tokens, neighbors, logits


def one_p(state: dict, c: dict) -> dict:
    """Norm weights as a LayerNorm-1p model stores them (w - 1) when the config is 1p."""
    if not c["layernorm_1p"]:
        return state
    return {k: (v - 1 if "norm" in k and k.endswith("weight") else v) for k, v in state.items()}


# The config also written as a Megatron-LM training checkpoint (torch_dist), for import-megatron.
DIST_CONFIG = "nine_layers"


def megatron_args(c: dict, tp: int = 1):
    """The training args Megatron-LM would record for config c (its argument names)."""
    return argparse.Namespace(
        num_layers=c["num_layers"], hidden_size=c["hidden_size"], num_attention_heads=c["num_attention_heads"],
        ffn_hidden_size=c["ffn_hidden_size"], seq_length=c["seq"], max_position_embeddings=c["seq"],
        padded_vocab_size=VOCAB, swiglu=c["swiglu"], add_bias_linear=c["add_bias_linear"],
        normalization="LayerNorm", apply_layernorm_1p=False, norm_epsilon=1e-5,
        position_embedding_type=c["position"], rotary_percent=c["rotary_percent"], rotary_base=10000,
        untie_embeddings_and_output_weights=c["untie"], tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1, retro_add_retriever=True, retro_gpt_chunk_length=c["chunk"],
        retro_num_neighbors=c["k"], retro_num_retrieved_chunks=c["retrieved_chunks"], retro_encoder_layers=2,
        use_mcore_models=True, ckpt_format="torch_dist",
    )


def save_dist(model, c: dict, root: Path, tp: int = 1) -> None:
    """root/latest_checkpointed_iteration.txt + root/iter_0000001/, as Megatron-LM's save_checkpoint lays them."""
    import shutil

    from megatron.core import dist_checkpointing

    torch.cuda.synchronize = lambda *a, **k: None
    import torch.distributed as td

    if td.get_rank() == 0:
        shutil.rmtree(root, ignore_errors=True)
        (root / "iter_0000001").mkdir(parents=True)
    td.barrier()
    state = {"model": model.sharded_state_dict(), "args": megatron_args(c, tp), "checkpoint_version": 3.0,
             "iteration": 1}
    dist_checkpointing.save(state, str(root / "iter_0000001"))
    if td.get_rank() == 0:
        (root / "latest_checkpointed_iteration.txt").write_text("1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for <config>.pt files")
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()
    import megatron.core

    _cpu_only()
    _init_parallel()
    a.out.mkdir(parents=True, exist_ok=True)
    import torch.distributed as td

    tp = td.get_world_size()
    if tp > 1:
        # Under torchrun: DIST_CONFIG at this tensor-parallel size, as a training checkpoint
        # plus the logits this sharded model computes (its shards are random, not the TP-1 ones).
        i = list(CONFIGS).index(DIST_CONFIG)
        c = CONFIGS[DIST_CONFIG]
        torch.manual_seed(a.seed + i)
        model = build(c, tp)
        randomise(model, a.seed + i, td.get_rank())
        tokens, neighbors, logits = forward(model, c, a.seed + i)
        save_dist(model, c, a.out / f"{DIST_CONFIG}_tp{tp}_torch_dist", tp)
        if td.get_rank() == 0:
            torch.save({"config": c, "vocab_size": VOCAB, "tokens": tokens, "neighbor_tokens": neighbors,
                        "logits": logits, "versions": {"megatron-core": megatron.core.__version__,
                                                       "torch": str(torch.__version__)}},
                       a.out / f"{DIST_CONFIG}_tp{tp}.pt")
            print(f"{DIST_CONFIG} at TP {tp}: logits {tuple(logits.shape)}, max |logit| {logits.abs().max():.4f}")
        return
    for i, (name, c) in enumerate(CONFIGS.items()):
        torch.manual_seed(a.seed + i)
        model = build(c)
        randomise(model, a.seed + i)
        tokens, neighbors, logits = forward(model, c, a.seed + i)
        state = {k: v.clone() for k, v in model.state_dict().items()
                 if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
        torch.save({"config": c, "vocab_size": VOCAB, "state_dict": one_p(state, c), "tokens": tokens,
                    "neighbor_tokens": neighbors, "logits": logits,
                    "versions": {"megatron-core": megatron.core.__version__, "torch": str(torch.__version__)}},
                   a.out / f"{name}.pt")
        if name == DIST_CONFIG:
            save_dist(model, c, a.out / f"{name}_torch_dist")
        print(f"{name}: {sum(v.numel() for v in state.values())} parameters, logits {tuple(logits.shape)}, "
              f"max |logit| {logits.abs().max():.4f}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
