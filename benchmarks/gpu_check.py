"""The one prepared GPU check: the paths only a GPU takes, then throughput. Exits 1 on any NaN.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --cpu --layers 2 --seq 256 --steps 4   # the script's own check

1. Fully masked attention rows (a missing neighbour, a chunk with none) under every SDPA
   backend the device has (CUDA: math, flash, memory-efficient, cuDNN), in bf16 and fp32:
   forward and backward of a small Retro must be finite and match the math backend; the raw
   kernel's own convention for such rows (NaN, 0, ...) is recorded beside it.
2. The pipeline through retro-run on one process per GPU (torchrun over several; NCCL, also for
   a single process): build_db on recipes/single_gpu.yaml's corpus with the embedder in bf16
   (embedding chunks/s), then retro_843m's shape with --layers layers pretrained in bf16 (MFU),
   SFT in bf16, eval_ppl and eval_qa (the KV cache) on models built in bf16, and export.
3. The exported package restored in bf16 on the GPU: peak GPU memory against its bf16 bytes
   (the model is built in bf16 there and the weights streamed in), logits finite.

Each part's result is written to --out as soon as it is known, and a part that fails is recorded
with its error while the next runs, so a run cut short still reports what it reached.

`--embedder` may name a folder holding a BERT's config and tokenizer without weights: the
embedder is then built with random weights of that shape (seed 0), which embeds at the same
speed as the trained model and is reported as such (the neighbours mean nothing then).

MFU = model FLOPs per step (matmuls, attention in full, x3 for forward + backward;
benchmarks/common.forward_flops) over the step time from the pretrain log's tok/s,
divided by the GPUs' dense bf16 peak. With --cpu, everything runs on the CPU, bf16 included.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Dense bf16 tensor-core peak per GPU, FLOP/s (vendor data sheets, SXM parts).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
CUDA_BACKENDS = ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
CPU_BACKENDS = ("MATH", "FLASH_ATTENTION")
# A small Retro whose every CCA and encoder path runs: chunk 16, k 2, CCA in layers 1 and 2.
KERNEL_SECTION = dict(arch="retro", num_layers=2, hidden_size=128, num_attention_heads=4, ffn_hidden_size=256,
                      seq_length=64, chunk_length=16, num_neighbors=2, num_retrieved_chunks=2, cca_layers=[1, 2],
                      hidden_dropout=0.0, attention_dropout=0.0, encoder_hidden_dropout=0.0,
                      encoder_attention_dropout=0.0, vocab_size=101)


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def kernel_convention(device: str, backend, dtype) -> str:
    """What the raw kernel returns for a query row whose keys are all masked."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    q = torch.randn(1, 2, 4, 64, device=device, dtype=dtype)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool, device=device)
    mask[..., 1, :] = False
    try:
        with sdpa_kernel([backend]):
            row = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)[0, :, 1]
    except RuntimeError:
        return "unsupported"
    if torch.isnan(row).any():
        return "nan"
    return "zero" if torch.count_nonzero(row) == 0 else "finite"


def kernel_checks(device: str) -> list[dict]:
    """Logits and gradients of a Retro with fully masked rows, per SDPA backend and dtype."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from retro_toolkit.collections.retro import build_model, config_from_model_section, initialize

    initialize(1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 101, (2, 64), generator=g)
    nb = torch.randint(4, 101, (2, 4, 2, 32), generator=g)
    nb[1, 2, 0] = -1  # a missing neighbour: whole rows of the encoder's self-attention masked
    nb[0, 1] = -1  # a chunk with no neighbour: whole rows of CCA masked
    nb[0, 3, 1, 9:] = -1  # a neighbour cut short by its document's end
    tokens, nb = tokens.to(device), nb.to(device)
    rows, reference = [], {}
    backends = CUDA_BACKENDS if device == "cuda" else CPU_BACKENDS
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        cfg, args = config_from_model_section(KERNEL_SECTION, params_dtype=dtype, bf16=dtype == torch.bfloat16,
                                              use_cpu_initialization=device == "cpu")
        model = build_model(cfg, args).to(device).train()
        for name in backends:
            backend = getattr(SDPBackend, name)
            row = {"dtype": str(dtype)[6:], "backend": name, "kernel_on_masked_row": kernel_convention(device, backend,
                                                                                                        dtype)}
            model.zero_grad()
            try:
                with sdpa_kernel([backend]):
                    logits = model(tokens, nb, runtime_gather_output=True)
                    logits.float().square().mean().backward()
            except RuntimeError as e:  # no kernel of this backend for these shapes or this dtype
                rows.append({**row, "ran": False, "why": str(e).splitlines()[0][:160]})
                continue
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            row.update(ran=True, logits_finite=bool(torch.isfinite(logits).all()),
                       grads_finite=all(bool(torch.isfinite(x).all()) for x in grads))
            ref = reference.setdefault(str(dtype), logits.detach().float())
            row["max_abs_diff_from_math"] = float((logits.detach().float() - ref).abs().max())
            rows.append(row)
    return rows


def retro_run(*args: str, timeout: float) -> float:
    t = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "retro_toolkit", *args], cwd=REPO, env=env, timeout=timeout,
                       capture_output=True, text=True)
    sys.stdout.write(p.stdout[-4000:])
    if p.returncode:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"retro-run failed (exit {p.returncode})")
    return time.perf_counter() - t


def restore_check(package: Path, device: str) -> dict:
    """The package in bf16 on the device: peak memory over its bf16 bytes, finite logits."""
    import torch

    from retro_toolkit.checkpoint import nemo

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    pkg = nemo.restore(package, dtype=torch.bfloat16, device=device)
    params = list(pkg.model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    out = {"dtype": str(params[0].dtype)[6:], "device": str(params[0].device), "bf16_weight_bytes": weight_bytes}
    if device == "cuda":
        out["peak_gpu_bytes_over_weight_bytes"] = round((torch.cuda.max_memory_allocated() - before) / weight_bytes, 3)
    m = pkg.section
    n, k, r = m["seq_length"], m["num_neighbors"], m["num_retrieved_chunks"] * m["chunk_length"]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, pkg.tokenizer.vocab_size, (1, n), generator=g).to(device)
    nb = torch.randint(4, pkg.tokenizer.vocab_size, (1, n // m["chunk_length"], k, r), generator=g).to(device)
    nb[0, 1] = -1
    with torch.no_grad():
        out["logits_finite"] = bool(torch.isfinite(pkg.model(tokens, nb, runtime_gather_output=True)).all())
    return out


def embedder_folder(path: str, workdir: Path) -> tuple[str, str]:
    """The embedder to use and what its weights are: a folder without weights gets random ones."""
    folder = Path(path)
    if path.startswith("builtin:") or any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
        return path, "trained"
    import shutil

    import torch
    from transformers import AutoConfig, AutoModel

    out = workdir.parent / (workdir.name + "_embedder")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(folder, out)
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(str(folder), local_files_only=True)).save_pretrained(str(out))
    return str(out), f"random weights, shape of {folder.name}"


class Report:
    """The result so far, written to --out after every part."""

    def __init__(self, out: Path | None, result: dict):
        self.out, self.result = out, result
        self.result.setdefault("errors", {})

    def part(self, name: str, fn):
        try:
            value = fn()
        except BaseException as e:  # a part that fails (SystemExit from retro-run too) is reported, not fatal
            if isinstance(e, KeyboardInterrupt):
                raise
            self.result["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
            value = None
        else:
            if value is not None:
                self.result[name] = value
        self.write()
        return value

    def write(self) -> None:
        if self.out:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.result, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/retro_gpu_check")
    ap.add_argument("--out", type=Path, help="also write the printed JSON to this file")
    ap.add_argument("--layers", type=int, default=12, help="decoder layers of retro_843m (24 = the full model)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--max-docs", type=int, default=120, help="transformers modeling files in the corpus")
    ap.add_argument("--embedder", default="builtin:all-minilm-l6-v2",
                    help="retrieval.embedder.path: a BERT folder where the bundled package is not installed "
                         "(config and tokenizer alone: random weights of that shape)")
    ap.add_argument("--cpu", action="store_true", help="everything on the CPU: checks the script itself")
    a = ap.parse_args()

    import warnings

    from retro_toolkit.core import malloc

    warnings.filterwarnings("ignore")  # library warnings would bury the report
    malloc.keep_freed_memory()  # glibc keeps freed memory, as in the model stages

    import torch

    from benchmarks.common import command

    gpus = 0 if a.cpu else torch.cuda.device_count()
    if not a.cpu and gpus == 0:
        raise SystemExit("no GPU visible (use --cpu to check the script itself)")
    device = "cuda" if gpus else "cpu"
    name = torch.cuda.get_device_name(0) if gpus else "cpu"
    result: dict = {"command": command(), "device": name, "gpus": gpus, "torch": torch.__version__}

    report = Report(a.out, result)

    # 1. fully masked rows under every kernel
    report.part("kernels", lambda: kernel_checks(device))

    # 2. the pipeline, bf16 throughout
    procs = max(1, gpus)
    executor = ["executor=torchrun", f"executor.nproc_per_node={procs}"] if procs > 1 else ["executor=local"]
    w = Path(a.workdir)
    global_batch = a.micro_batch * procs
    embedder, weights = embedder_folder(a.embedder, w)
    common = ["recipes/single_gpu.yaml", f"workdir={w}", *executor,
              f"data.sources=[{{path: builtin:transformers-modeling, max_docs: {a.max_docs}}}, {{path: builtin:pydoc}}]",
              "data.split=[0.9,0.05,0.05]", f"retrieval.embedder.path={embedder}"]
    common += ["tokenizer.vocab_size=2000"] if a.cpu else []

    def embedding() -> dict:
        wall = retro_run(*common, "stages=[tokenizer,prepare_corpus,build_db]", timeout=3600)
        summary = json.loads((w / "stages" / "build_db.json").read_text())["summary"]
        chunks, embed_s = summary["db_chunks"], summary["timings"]["embed_s"]
        return {"chunks": chunks, "embed_s": embed_s, "chunks_per_s": round(chunks / embed_s, 1),
                "chunks_per_gpu_hour": round(chunks / embed_s * 3600 / max(1, gpus)), "embedder": a.embedder,
                "embedder_weights": weights, "build_db_wall_s": round(wall, 1), "timings": summary["timings"]}

    if report.part("embedding", embedding) is not None:
        report.part("pretrain", lambda: pipeline(a, common, w, gpus, global_batch, peak_flops(name), report))
        # 3. the package, restored in bf16
        report.part("restore", lambda: restore_check(w / "export" / "single_gpu.nemo", device))

    r = report.result
    numbers = [*r.get("losses", []), *r.get("sft_losses", []),
               *(v for row in r.get("ppl", {}).values() for k, v in row.items() if k.startswith("ppl"))]
    failures = [f"{x['backend']} {x['dtype']}" for x in r.get("kernels", [])
                if x["ran"] and not (x["logits_finite"] and x["grads_finite"])]
    failures += ["training or eval produced a non-finite number"] if not all(map(math.isfinite, numbers)) else []
    failures += ["restored logits are not finite"] if not r.get("restore", {}).get("logits_finite", False) else []
    failures += [f"{k} failed" for k in r["errors"]]
    r["failures"] = failures
    report.write()
    print(json.dumps(r, indent=2))
    if failures:
        raise SystemExit("gpu check failed: " + "; ".join(failures))


def pipeline(a, common: list[str], w: Path, gpus: int, global_batch: int, peak: float | None, report: Report) -> dict:
    """Pretrain, SFT, eval and export in bf16; the pretrain figures (the rest goes into the report)."""
    import yaml

    from benchmarks.common import forward_flops
    from retro_toolkit.collections.retro.config import default_cca_layers

    cca = "null" if a.layers >= 6 else f"[{a.layers}]"  # Retro's rule needs 6 layers or more
    train = [*common, "model=retro_843m", "model.vocab_size=null", f"model.num_layers={a.layers}", f"model.cca_layers={cca}",
             f"model.seq_length={a.seq}", f"pretrain.train_iters={a.steps}", f"pretrain.micro_batch_size={a.micro_batch}",
             f"pretrain.global_batch_size={global_batch}", "pretrain.gpt_twin=false", "pretrain.lr=1e-4",
             "pretrain.min_lr=1e-5", f"pretrain.lr_warmup_iters={max(1, a.steps // 10)}", "pretrain.save_interval=0",
             f"pretrain.log_interval={max(1, a.steps // 20)}", "pretrain.tensorboard=false", "eval_ppl.max_samples=64",
             "sft.train_iters=10", f"sft.micro_batch_size={a.micro_batch}", f"sft.global_batch_size={global_batch}",
             "eval_qa.tasks=[{name: smoke, path: 'builtin:smoke-qa', max_samples: 8}]"]
    try:
        train_wall = retro_run(*train, timeout=3600)
    finally:  # whatever stages finished are reported
        read = lambda rel: (w / rel).read_text() if (w / rel).exists() else ""  # noqa: E731
        losses = [json.loads(x)["loss"] for x in read("metrics/pretrain.jsonl").splitlines()]
        report.result["losses"] = losses
        report.result["sft_losses"] = [json.loads(x)["loss"] for x in read("metrics/sft.jsonl").splitlines()]
        report.result["ppl"] = json.loads(read("eval/ppl.json") or "{}")
        report.result["qa"] = json.loads(read("eval/qa/scores.json") or "{}")
    log = read("logs/pretrain.rank0.log")
    tps = [float(x.replace(",", "")) for x in re.findall(r"\| ([\d,]+) tok/s \|", log)]
    steady = statistics.median(tps[len(tps) // 2:]) if tps else float("nan")
    recipe = yaml.safe_load(read("recipe.resolved.yaml"))
    section = {**recipe["model"], "vocab_size": int(json.loads(read("stages/tokenizer.json"))["summary"]["vocab_size"])}
    section["cca_layers"] = section.get("cca_layers") or default_cca_layers(section["num_layers"])
    step_flops = 3 * forward_flops(section, True, global_batch)
    step_s = global_batch * a.seq / steady
    return {"layers": a.layers, "seq_length": a.seq, "global_batch": global_batch, "steps": a.steps, "bf16": True,
            "first_loss": losses[0], "last_loss": losses[-1], "tokens_per_s": round(steady), "step_s": round(step_s, 4),
            "model_tflops_per_step": round(step_flops / 1e12, 3),
            "achieved_tflops_per_gpu": round(step_flops / step_s / max(1, gpus) / 1e12, 2),
            "peak_tflops_per_gpu": peak / 1e12 if peak else None,
            "mfu": round(step_flops / step_s / max(1, gpus) / peak, 4) if peak and gpus else None,
            "wall_s_with_sft_eval_export": round(train_wall, 1)}

if __name__ == "__main__":
    main()
