"""Reference logits from legacy Megatron-LM's Retro (megatron/model/, the `InstructRetro` tag).

The model NVIDIA's released Retro / InstructRetro checkpoints come from: megatron.model.GPTModel
with args.retro_add_retriever (ParallelTransformer with retro_decoder / retro_encoder layers,
megatron/model/transformer.py). This script runs that upstream code itself at tiny sizes on CPU.

usage (its own tree and virtual environment, CPU; of this project only the config table of
make_mcore_reference.py is imported):
    G=/work/.mirror/NVIDIA+Megatron-LM/repo   # bare git dir of github:NVIDIA/Megatron-LM (or any clone's .git)
    mkdir -p /tmp/megatron_legacy && git --git-dir=$G archive InstructRetro | tar -x -C /tmp/megatron_legacy
    git --git-dir=$G rev-parse 'InstructRetro^{commit}' > /tmp/megatron_legacy/.commit   # recorded in "versions"
    python3 -m venv /tmp/legacy_venv && /tmp/legacy_venv/bin/pip install torch==2.13.0 numpy psutil einops \
        six regex "setuptools>=77,<81"
    /tmp/legacy_venv/bin/python tests/fidelity/make_legacy_reference.py --megatron /tmp/megatron_legacy \
        --out tests/fidelity/data
    /tmp/legacy_venv/bin/torchrun --nproc-per-node 2 tests/fidelity/make_legacy_reference.py \
        --megatron /tmp/megatron_legacy --out tests/fidelity/data

(six and regex: megatron/tokenizer imports them; setuptools < 81: the tree's megatron/core
imports pkg_resources.) Run both from the repository root: the checkpoints' pickled args record
--save as given (tests/fidelity/data/legacy_..._checkpoint), as a training run records its own.

CONFIGS, VOCAB, BATCH and the checkpointed config (DIST_CONFIG, nine_layers) are those of the
sibling script make_mcore_reference.py, loaded by path (importlib; it imports only torch and the
standard library at module level), so both references are always of the same shapes; nothing
else of this project is imported. For each config in CONFIGS it
parses Megatron-LM's own command line (megatron.arguments.parse_args / validate_args, flags in
`flags()`), writes the Retro workdir args.json that validate_args reads the chunk length from,
builds megatron.model.GPTModel as pretrain_gpt.py's model_provider does, gives every parameter
seeded random values (biases and norm weights included), and runs one float32 forward in eval
mode on random tokens and neighbours laid out as pretrain_retro.py's get_batch gives them
(neighbour tokens [b*l*k, r], neighbour positions from get_ltor_masks_and_position_ids, i.e.
0..r-1, no neighbour mask; the causal mask and positions of the tokens from the same function).
It saves legacy_<name>.pt = {"config", "vocab_size", "state_dict" (legacy names, the flattened
state_dict_for_save_checkpoint() a legacy checkpoint's "model" entry holds, which equals
model.state_dict()), "args" (the training args the model saw, plain values), "retro_args"
(the workdir args.json), "tokens", "neighbor_tokens" [b, l, k, r], "logits" [b, n, vocab],
"versions"}.

Checkpoint (DIST_CONFIG only), written by the tree's own megatron.checkpointing.save_checkpoint(
iteration=1, [model], optimizer=None, opt_param_scheduler=None), with the args re-parsed from
the same flags plus `--save DIR --save-interval 1 --no-save-optim --no-save-rng` (and model_type /
padded_vocab_size set as before), so the pickled args are the tree's argparse.Namespace as
training pickles it, nothing stripped (model_type is megatron.core.enums.ModelType.retro_decoder,
params_dtype torch.float32, ...). The model is the one whose logits legacy_<name>.pt holds.
  * save_checkpoint writes DIR/iter_0000001/mp_rank_TT/model_optim_rng.pt and
    latest_checkpointed_iteration.txt = "1"; the tree has no code that writes a release
    checkpoint, so iter_0000001/ is then renamed release/ and the tracker rewritten to
    "release": the layout of NVIDIA's released checkpoints, which the tree's loader reads
    (read_metadata, get_checkpoint_name(release=True)). The dict is what save_checkpoint
    builds: {"args", "checkpoint_version": 3.0, "iteration": 1, "model":
    model.state_dict_for_save_checkpoint()}.
  * No "rng_state" (--no-save-rng): save_checkpoint's get_rng_state() includes
    torch.cuda.get_rng_state() and the CUDA RNG tracker states, which do not exist on CPU.
    get_rng_state() runs anyway (before the flag is looked at), so torch.cuda.get_rng_state
    returns an empty tensor for the duration of the call; its result is discarded.
  * No "optimizer" / "opt_param_scheduler" (there is none: released checkpoints carry none).
Under torchrun with N ranks only DIST_CONFIG is built, at tensor-parallel size N: every rank's
shards drawn from its own seed, replicated tensors (norms, row-parallel biases) from a shared
one, as make_mcore_reference.py does; it writes legacy_<name>_tpN_checkpoint/ (mp_rank_00 ..
mp_rank_N-1, by save_checkpoint as above) and legacy_<name>_tpN.pt = {"config", "vocab_size",
"args", "retro_args", "tokens", "neighbor_tokens", "logits" (the full vocabulary, gathered with
the tree's gather_from_tensor_model_parallel_region, what parallel_output=False would do),
"versions"}. Each rank's pickled args are its own, as in a training run (they differ in `rank`).
The Retro workdir is a fixed path (/tmp/retro_workdir_legacy_<name>, removed after), so the
pickled args, which record it, are the same on every run; they do not record the chunk length
(validate_args read it from that workdir's args.json), which legacy_<name>[_tpN].pt's
"retro_args" holds.

Shims, none of which touches layer math (installed in `_shims`, before megatron is imported):
  * transformer_engine: an empty stand-in module. The tree's megatron/arguments.py imports
    megatron.core.models.retro (RetroConfig), whose import chain reaches
    megatron/core/transformer/custom_layers/transformer_engine.py (`import transformer_engine`,
    classes derived from te.pytorch.*). The legacy model (--transformer-impl local) never builds
    any of them; the stand-in's classes raise if constructed.
  * apex: fused_layer_norm_cuda (the CUDA extension MixedFusedLayerNorm imports in __init__) is
    an empty module, and apex.normalization.fused_layer_norm.fused_layer_norm_affine is
    torch.nn.functional.layer_norm(input, normalized_shape, weight, bias, eps), the same
    function apex's CUDA kernel computes. The weight passed is still MixedFusedLayerNorm's own
    (self.weight + 1 under --apply-layernorm-1p). apex's persistent FastLayerNormFN is absent,
    so the non-persistent path is taken, as the tree does for hidden sizes outside its list.
  * device: torch.cuda.current_device() returns "cpu" (RotaryEmbedding's inv_freq, the global
    memory buffer of CoreAttention's baddbmm), and CudaRNGStatesTracker.fork is a null context
    (it only swaps CUDA RNG states around dropout, which is p=0 in eval mode here).
Fusions are off by flags (--no-masked-softmax-fusion, --no-bias-gelu-fusion, ...), so the
tree's own unfused torch paths run: FusedScaleMaskSoftmax.forward_torch_softmax, bias_dropout_add.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path


def _sibling(name: str) -> types.ModuleType:
    """A script next to this one, imported by path (it is not part of a package)."""
    path = Path(__file__).resolve().parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_fidelity_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is first imported (by the sibling)

# Shapes (InstructRetro's, a 9-layer one with two CCA layers, the classic GPT-2 style), vocabulary,
# batch and the checkpointed config: make_mcore_reference.py's, so both references are of the same.
_MCORE = _sibling("make_mcore_reference")
CONFIGS, VOCAB, BATCH = _MCORE.CONFIGS, _MCORE.VOCAB, _MCORE.BATCH
CHECKPOINT_CONFIG = _MCORE.DIST_CONFIG


def flags(c: dict, workdir: str, tp: int = 1) -> list[str]:
    """Megatron-LM command-line flags for config c (as a pretrain_retro.py run would pass them)."""
    f = ["--num-layers", str(c["num_layers"]), "--hidden-size", str(c["hidden_size"]),
         "--num-attention-heads", str(c["num_attention_heads"]), "--ffn-hidden-size", str(c["ffn_hidden_size"]),
         "--seq-length", str(c["seq"]), "--max-position-embeddings", str(c["seq"]),
         "--micro-batch-size", str(BATCH), "--global-batch-size", str(BATCH),
         "--hidden-dropout", "0.0", "--attention-dropout", "0.0",
         "--retro-encoder-hidden-dropout", "0.0", "--retro-encoder-attention-dropout", "0.0",
         "--retro-add-retriever", "--retro-workdir", workdir, "--retro-num-neighbors", str(c["k"]),
         "--retro-num-retrieved-chunks", str(c["retrieved_chunks"]), "--retro-encoder-layers", "2",
         "--normalization", "LayerNorm", "--norm-epsilon", "1e-5",
         "--position-embedding-type", c["position"], "--rotary-percent", str(c["rotary_percent"]),
         "--transformer-impl", "local", "--use-cpu-initialization", "--no-masked-softmax-fusion",
         "--no-bias-gelu-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",
         "--no-gradient-accumulation-fusion", "--no-persist-layer-norm",
         "--no-async-tensor-model-parallel-allreduce", "--init-method-std", "0.02",
         "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", "1",
         "--tokenizer-type", "GPTSentencePieceTokenizer", "--seed", "1234"]
    if c["swiglu"]:
        f.append("--swiglu")
    if not c["add_bias_linear"]:
        f.append("--disable-bias-linear")
    if c["untie"]:
        f.append("--untie-embeddings-and-output-weights")
    if c["layernorm_1p"]:
        f.append("--apply-layernorm-1p")
    return f


def _shims() -> None:
    import torch
    import torch.nn.functional as F

    # transformer_engine: imported (never used) by the tree's megatron.core.transformer chain.
    class _Absent:
        def __init__(self, *a, **k):
            raise RuntimeError("transformer_engine is not installed; the legacy model must not build it")

    te = types.ModuleType("transformer_engine")
    te.pytorch = types.ModuleType("transformer_engine.pytorch")
    for name in ("Linear", "LayerNormLinear", "DotProductAttention", "LayerNorm", "RMSNorm", "TransformerLayer"):
        setattr(te.pytorch, name, type(name, (_Absent,), {}))
    sys.modules["transformer_engine"] = te
    sys.modules["transformer_engine.pytorch"] = te.pytorch

    # apex: the fused LayerNorm CUDA kernel's forward is exactly torch's layer_norm.
    def fused_layer_norm_affine(input, weight, bias, normalized_shape, eps=1e-6, memory_efficient=False):
        return F.layer_norm(input, normalized_shape, weight, bias, eps)

    sys.modules["fused_layer_norm_cuda"] = types.ModuleType("fused_layer_norm_cuda")
    apex = types.ModuleType("apex")
    apex.normalization = types.ModuleType("apex.normalization")
    apex.normalization.fused_layer_norm = types.ModuleType("apex.normalization.fused_layer_norm")
    apex.normalization.fused_layer_norm.fused_layer_norm_affine = fused_layer_norm_affine
    sys.modules.update({"apex": apex, "apex.normalization": apex.normalization,
                        "apex.normalization.fused_layer_norm": apex.normalization.fused_layer_norm})

    # Device placement only.
    torch.cuda.current_device = lambda: "cpu"


def _after_import_shims() -> None:
    from megatron.core.tensor_parallel import random as tp_random

    tp_random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()


def set_args(c: dict, workdir: Path, tp: int = 1, extra: tuple[str, ...] = ()):
    """Megatron-LM's global args (and Retro args from the workdir) for config c; `extra` flags
    are appended to flags(c)."""
    import torch.distributed as td
    from megatron import global_vars
    from megatron.arguments import parse_args, validate_args

    retro_args = {"retro_gpt_chunk_length": c["chunk"], "retro_gpt_seq_length": c["seq"]}
    if td.get_rank() == 0:
        (workdir / "args.json").write_text(json.dumps(retro_args))
    td.barrier()
    # parse_args reads sys.argv.
    argv, sys.argv = sys.argv, ["pretrain_retro.py"] + flags(c, str(workdir), tp) + list(extra)
    try:
        args = parse_args()
    finally:
        sys.argv = argv
    args = validate_args(args, {})
    # Fresh globals per config (set_global_variables refuses to set them twice).
    for name in ("_GLOBAL_ARGS", "_GLOBAL_NUM_MICROBATCHES_CALCULATOR", "_GLOBAL_TIMERS",
                 "_GLOBAL_TOKENIZER", "_GLOBAL_TENSORBOARD_WRITER", "_GLOBAL_WANDB_WRITER",
                 "_GLOBAL_ADLR_AUTORESUME", "_GLOBAL_SIGNAL_HANDLER"):
        if hasattr(global_vars, name):
            setattr(global_vars, name, None)
    global_vars.set_global_variables(args, build_tokenizer=False)
    from megatron.core.enums import ModelType

    args.model_type = ModelType.retro_decoder  # what training.get_model sets from pretrain_retro.py's pretrain()
    args.padded_vocab_size = VOCAB  # what _vocab_size_with_padding would give a tokenizer of VOCAB pieces
    return args, retro_args


def build(args):
    """megatron.model.GPTModel as pretrain_gpt.py's model_provider builds it (legacy path)."""
    from megatron.arguments import core_transformer_config_from_args
    from megatron.model import GPTModel

    config = core_transformer_config_from_args(args)
    model = GPTModel(config, num_tokentypes=0, parallel_output=True, pre_process=True, post_process=True)
    return model.eval()


def randomise(model, c: dict, seed: int, tp: int = 1, rank: int = 0) -> None:
    """Seeded values for every parameter. Norm weights are stored as the model stores them:
    around 1, or around 0 under --apply-layernorm-1p (MixedFusedLayerNorm adds the 1). At
    tensor-parallel size > 1 a shard (tensor_model_parallel) draws from its rank's generator and a
    replicated tensor from one shared by all ranks (make_mcore_reference.randomise's scheme); at
    size 1 everything draws from one generator."""
    import torch

    g = torch.Generator().manual_seed(seed)
    own = torch.Generator().manual_seed(seed + 1000 * (rank + 1)) if tp > 1 else g
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.1 if name.endswith("bias") else (0.2 if p.dim() == 1 else 0.08)
            norm_weight = p.dim() == 1 and "norm" in name and name.endswith("weight")
            mean = 1.0 if norm_weight and not c["layernorm_1p"] else 0.0
            gen = own if getattr(p, "tensor_model_parallel", False) else g
            p.copy_(mean + std * torch.randn(p.shape, generator=gen))


def forward(model, c: dict, args, retro_args: dict, seed: int):
    import torch
    from megatron.utils import get_ltor_masks_and_position_ids

    g = torch.Generator().manual_seed(seed + 1)
    n, m, k = c["seq"], c["chunk"], c["k"]
    r = c["retrieved_chunks"] * m
    tokens = torch.randint(0, VOCAB, (BATCH, n), generator=g)
    neighbors = torch.randint(0, VOCAB, (BATCH, n // m, k, r), generator=g)
    eod = VOCAB - 1  # only used to reset positions / masks, which are off (pretrain_retro defaults)
    # pretrain_retro.get_batch: neighbour tokens viewed as [bs * l * k, r].
    neighbor_tokens = neighbors.view(-1, r)
    attention_mask, _, position_ids = get_ltor_masks_and_position_ids(
        tokens, eod, args.reset_position_ids, args.reset_attention_mask, args.eod_mask_loss)
    _, _, neighbor_position_ids = get_ltor_masks_and_position_ids(
        neighbor_tokens, eod, args.reset_position_ids, args.reset_attention_mask, args.eod_mask_loss)
    with torch.no_grad():
        logits = model(tokens, position_ids, attention_mask, retriever_input_ids=neighbor_tokens,
                       retriever_position_ids=neighbor_position_ids, retriever_attn_mask=None)
    return tokens, neighbors, logits


def save_release_checkpoint(c: dict, model, workdir: Path, root: Path, tp: int = 1) -> None:
    """root/latest_checkpointed_iteration.txt ("release") + root/release/mp_rank_TT/model_optim_rng.pt,
    written by the tree's megatron.checkpointing.save_checkpoint (see the module docstring)."""
    import torch
    import torch.distributed as td
    from megatron.checkpointing import get_checkpoint_tracker_filename, save_checkpoint
    from megatron.core.enums import ModelType

    if td.get_rank() == 0:
        shutil.rmtree(root, ignore_errors=True)
    td.barrier()
    # The args a training run with these flags would hold (validate_args wants a --save-interval with --save).
    args, _ = set_args(c, workdir, tp, ("--save", str(root), "--save-interval", "1",
                                        "--no-save-optim", "--no-save-rng"))
    assert args.model_type is ModelType.retro_decoder and args.no_save_rng and args.save == str(root)
    cuda_rng, torch.cuda.get_rng_state = torch.cuda.get_rng_state, lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    try:
        save_checkpoint(1, [model], None, None)
    finally:
        torch.cuda.get_rng_state = cuda_rng
    if td.get_rank() == 0:
        # A release checkpoint: the iteration folder renamed, the tracker says "release".
        (root / "iter_0000001").rename(root / "release")
        Path(get_checkpoint_tracker_filename(str(root))).write_text("release")
    td.barrier()


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = v
    return out


def plain(args) -> dict:
    """The args as plain values (torch dtypes and other objects as their str)."""
    out = {}
    for key, v in sorted(vars(args).items()):
        if v is None or isinstance(v, (bool, int, float, str)):
            out[key] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (bool, int, float, str)) for x in v):
            out[key] = list(v)
        else:
            out[key] = str(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--megatron", type=Path, default=Path("/tmp/megatron_legacy"),
                    help="the exported InstructRetro tree of Megatron-LM")
    ap.add_argument("--out", type=Path, required=True, help="folder for legacy_<config>.pt files")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--only", nargs="*", default=None, help="config names (default: all)")
    a = ap.parse_args()
    sys.path.insert(0, str(a.megatron.resolve()))
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _shims()
    import torch
    import torch.distributed as td

    import megatron  # noqa: F401  (the tree's, first on sys.path)

    assert Path(megatron.__file__).resolve().is_relative_to(a.megatron.resolve()), megatron.__file__
    _after_import_shims()
    _MCORE._init_parallel()  # resolves megatron.core from the legacy tree, first on sys.path
    tp = td.get_world_size()
    rank = td.get_rank()
    a.out.mkdir(parents=True, exist_ok=True)
    commit = (a.megatron / ".commit").read_text().strip() if (a.megatron / ".commit").is_file() else "unknown"
    versions = {"megatron-lm": f"InstructRetro tag, commit {commit} (legacy megatron/model)",
                "torch": str(torch.__version__)}
    for i, (name, c) in enumerate(CONFIGS.items()):
        if (a.only and name not in a.only) or (tp > 1 and name != CHECKPOINT_CONFIG):
            continue
        t0 = time.time()
        torch.manual_seed(a.seed + i)
        # A fixed path: the checkpoint's pickled args record it.
        workdir = Path(tempfile.gettempdir()) / f"retro_workdir_legacy_{name}"
        if rank == 0:
            workdir.mkdir(exist_ok=True)
        td.barrier()
        try:
            args, retro_args = set_args(c, workdir, tp)
            model = build(args)
            randomise(model, c, a.seed + i, tp, rank)
            tokens, neighbors, logits = forward(model, c, args, retro_args, a.seed + i)
            args_plain = plain(args)
            args_plain["retro_workdir"] = None  # a temporary folder; retro_args holds its args.json
            state = {key: v.detach().clone() for key, v in model.state_dict().items()
                     if isinstance(v, torch.Tensor)}
            if tp > 1:
                from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

                logits = gather_from_tensor_model_parallel_region(logits)  # [b, n, vocab / tp] -> [b, n, vocab]
                if rank == 0:
                    torch.save({"config": c, "vocab_size": VOCAB, "args": args_plain, "retro_args": retro_args,
                                "tokens": tokens, "neighbor_tokens": neighbors, "logits": logits.detach().clone(),
                                "versions": versions}, a.out / f"legacy_{name}_tp{tp}.pt")
            else:
                saved = flatten(model.state_dict_for_save_checkpoint())
                # Both also hold *._extra_state entries (None, from the tree's parallel linears); tensors only.
                saved = {key for key, v in saved.items() if isinstance(v, torch.Tensor)}
                assert saved == set(state), sorted(saved ^ set(state))
                torch.save({"config": c, "vocab_size": VOCAB, "state_dict": state, "args": args_plain,
                            "retro_args": retro_args, "tokens": tokens, "neighbor_tokens": neighbors,
                            "logits": logits.detach().clone(), "versions": versions},
                           a.out / f"legacy_{name}.pt")
            if name == CHECKPOINT_CONFIG:
                root = a.out / (f"legacy_{name}_checkpoint" if tp == 1 else f"legacy_{name}_tp{tp}_checkpoint")
                save_release_checkpoint(c, model, workdir, root, tp)
                shard = torch.load(root / "release" / f"mp_rank_{rank:02d}" / "model_optim_rng.pt",
                                   map_location="cpu", weights_only=False)
                written = {key: v for key, v in flatten(shard["model"]).items() if isinstance(v, torch.Tensor)}
                assert written.keys() == state.keys() and all(torch.equal(written[k], state[k]) for k in state)
        finally:
            td.barrier()
            if rank == 0:
                shutil.rmtree(workdir, ignore_errors=True)
        if rank == 0:
            print(f"{name}{f' at TP {tp}' if tp > 1 else ''}: {sum(v.numel() for v in state.values())} parameters"
                  f"{' (rank 0)' if tp > 1 else ''}, logits {tuple(logits.shape)}, "
                  f"max |logit| {logits.abs().max():.4f}, {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
