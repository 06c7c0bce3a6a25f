"""The GPU check of the scale-out issue: build the demo database with the embedder on the
GPUs, then pretrain retro_843m (fewer layers allowed) in bf16 on it; report embedding
chunks/s and MFU. One script, run once on a machine with GPUs:

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --cpu --layers 2 --seq 256 --steps 4   # the script's own check

Both stages run through retro-run (torchrun over every visible GPU), so this measures the
toolkit's real paths: BertEmbedder in bf16, faiss (GPU k-means with faiss-gpu), NCCL,
megatron-core DDP + distributed optimizer, bf16. MFU = model FLOPs per step (matmuls,
attention in full, x3 for forward + backward; benchmarks/model_step.forward_flops) over
the step time from the pretrain log's tok/s, divided by the GPUs' dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

# Dense bf16 tensor-core peak per GPU, FLOP/s (vendor data sheets, SXM parts).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/retro_gpu_check")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--layers", type=int, default=12, help="decoder layers of retro_843m (24 = the full model)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--max-docs", type=int, default=None, help="demo articles (default: all 105)")
    ap.add_argument("--cpu", action="store_true", help="fp32 on CPU: only checks that the script works")
    a = ap.parse_args()

    import torch
    import yaml

    from model_step import forward_flops

    gpus = 0 if a.cpu else torch.cuda.device_count()
    if not a.cpu and gpus == 0:
        raise SystemExit("no GPU visible (use --cpu to check the script itself)")
    name = torch.cuda.get_device_name(0) if gpus else "cpu"
    procs = max(1, gpus)
    executor = ["executor=torchrun", f"executor.nproc_per_node={procs}"] if procs > 1 else ["executor=local"]
    w = Path(a.workdir)
    data = ["recipes/demo_wiki.yaml", f"workdir={w}"]
    if a.max_docs:
        data.append(f"data.sources=[{{path: builtin:wiki-sample, max_docs: {a.max_docs}}}]")

    # 1. the database: BERT embeddings on the GPUs, faiss index, neighbours
    db_wall = retro_run(*data, *executor, timeout=3600)
    summary = json.loads((w / "stages" / "build_db.json").read_text())["summary"]
    chunks, embed_s = summary["db_chunks"], summary["timings"]["embed_s"]

    # 2. pretrain retro_843m's shape with fewer layers, bf16, on that database
    global_batch = a.micro_batch * procs
    train = [*data, *executor, "stages=[tokenizer,prepare_corpus,build_db,pretrain]", "model=retro_843m",
             "model.vocab_size=null", f"model.num_layers={a.layers}", f"model.seq_length={a.seq}",
             f"pretrain.train_iters={a.steps}", f"pretrain.micro_batch_size={a.micro_batch}",
             f"pretrain.global_batch_size={global_batch}", f"pretrain.bf16={str(not a.cpu).lower()}",
             "pretrain.lr=1e-4", "pretrain.min_lr=1e-5", f"pretrain.lr_warmup_iters={max(1, a.steps // 10)}",
             "pretrain.save_interval=0", f"pretrain.log_interval={max(1, a.steps // 20)}", "pretrain.tensorboard=false"]
    train_wall = retro_run(*train, timeout=3600)
    log = (w / "logs" / "pretrain.rank0.log").read_text()
    tps = [float(x.replace(",", "")) for x in re.findall(r"\| ([\d,]+) tok/s \|", log)]
    steady = statistics.median(tps[len(tps) // 2:]) if tps else float("nan")

    recipe = yaml.safe_load((w / "recipe.resolved.yaml").read_text())
    section = {**recipe["model"], "vocab_size": int(json.loads((w / "stages" / "tokenizer.json").read_text())
                                                   ["summary"]["vocab_size"])}
    from retro_toolkit.collections.retro.config import default_cca_layers

    section["cca_layers"] = section.get("cca_layers") or default_cca_layers(section["num_layers"])
    step_flops = 3 * forward_flops(section, True, global_batch)
    step_s = global_batch * a.seq / steady
    peak = peak_flops(name)
    result = {
        "device": name, "gpus": gpus, "processes": procs,
        "embedding": {"chunks": chunks, "embed_s": embed_s, "chunks_per_s": round(chunks / embed_s, 1),
                      "chunks_per_gpu_hour": round(chunks / embed_s * 3600 / max(1, gpus)),
                      "embedder": recipe["retrieval"]["embedder"]["path"], "build_db_wall_s": round(db_wall, 1)},
        "pretrain": {"layers": a.layers, "seq_length": a.seq, "global_batch": global_batch, "steps": a.steps,
                     "bf16": not a.cpu, "tokens_per_s": round(steady), "step_s": round(step_s, 4),
                     "model_tflops_per_step": round(step_flops / 1e12, 3),
                     "achieved_tflops_per_gpu": round(step_flops / step_s / max(1, gpus) / 1e12, 2),
                     "peak_tflops_per_gpu": peak / 1e12 if peak else None,
                     "mfu": round(step_flops / step_s / max(1, gpus) / peak, 4) if peak and gpus else None,
                     "wall_s": round(train_wall, 1)},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
