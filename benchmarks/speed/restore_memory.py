"""Peak memory to restore a .nemo package in bf16: the weights streamed into a model built in
bf16 (retro_toolkit's restore) against the model built and loaded in fp32, then cast.

    python benchmarks/speed/restore_memory.py [--hidden 2048] [--layers 8] [--vocab 32000] [--out FILE.json]

Writes an fp32 package of an 853M-parameter Retro (3.4 GB; `--hidden/--layers/--vocab` to
change), then restores it in fresh processes, each measuring its own increase over the
baseline it reached after importing everything: peak RSS (the kernel's VmHWM, reset first)
and peak RssAnon (sampled every 2 ms; a memory map's file pages count in RSS, not here).
Cases, side by side in one run:
  restore_bf16       restore(package, dtype=bfloat16): model built in bf16, weights copied in
                     one tensor at a time from the memory-mapped file
  restore_fp32       the same at the package's own dtype
  restore_dist_bf16  the same package with dist weights (export.weights=dist)
  fp32_then_cast     the way before: fp32 model initialised, whole state dict loaded, cast
The ratio that matters: peak RSS increase / the model's bf16 bytes (bound 1.3).

The recorded result:
    python benchmarks/speed/restore_memory.py --out benchmarks/results/restore_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks.common import PeakMemory, add_out, write_result  # noqa: E402

CASES = ("restore_bf16", "restore_fp32", "restore_dist_bf16", "fp32_then_cast")


def section(a) -> dict:
    return dict(arch="retro", num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=16,
                ffn_hidden_size=4 * a.hidden, seq_length=512, chunk_length=64, cca_layers=[a.layers // 2, a.layers],
                vocab_size=a.vocab, untie_embeddings_and_output_weights=True, swiglu=True, add_bias_linear=False)


def make(a, tmp: Path) -> dict:
    """The fp32 packages (file and dist weights) and the tokenizer they carry."""
    import torch

    from retro_toolkit.checkpoint.export import write_model
    from retro_toolkit.collections.retro import build_model, config_from_model_section, initialize
    from retro_toolkit.collections.text.sentencepiece_tokenizer import train_sentencepiece

    tok = tmp / "tokenizer.model"
    train_sentencepiece(["the quick brown fox jumps over the lazy dog", "def f(x): return x + 1"] * 50, tok, 64,
                        "bpe", 1.0, 10000, False, 1)
    initialize(1)
    cfg, args = config_from_model_section(section(a), perform_initialization=False)
    model = build_model(cfg, args)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g)
    out = {w: str(write_model(model, section(a), tok, tmp / f"{w}.nemo", None, w)) for w in ("file", "dist")}
    out["parameters"] = sum(p.numel() for p in model.parameters())
    return out


def measure(a, case: str, packages: dict) -> dict:
    """One case in this (fresh) process: increases over the post-import baseline, in bytes."""
    import torch

    from retro_toolkit.checkpoint import nemo
    from retro_toolkit.collections.retro import build_model, config_from_model_section, initialize

    initialize(1)
    warm, _ = config_from_model_section({**section(a), "num_layers": 2, "cca_layers": [2], "hidden_size": 64,
                                         "ffn_hidden_size": 256, "num_attention_heads": 4, "vocab_size": 64})
    build_model(warm, _)  # first-use imports and allocations belong to the baseline
    with PeakMemory() as mem:
        t = time.perf_counter()
        if case == "fp32_then_cast":
            cfg, args = config_from_model_section(section(a))
            model = build_model(cfg, args)
            with tempfile.TemporaryDirectory() as tmp:
                from retro_toolkit.checkpoint import archive

                root = archive.extract(Path(packages["file"]), tmp)
                nemo.load_full(model, torch.load(root / nemo.WEIGHTS_FILE, map_location="cpu", weights_only=True), "x")
            model = model.to(torch.bfloat16).eval()
        else:
            dtype = torch.float32 if case == "restore_fp32" else torch.bfloat16
            package = packages["dist" if case == "restore_dist_bf16" else "file"]
            model = nemo.restore(package, device="cpu", dtype=dtype).model
        seconds = time.perf_counter() - t
    params = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in params)
    return {"case": case, "seconds": round(seconds, 2), "dtype": str(params[0].dtype),
            "model_bytes": sum(p.numel() * p.element_size() for p in params),
            "baseline_rss": mem.base["VmRSS"], "peak_rss_increase": mem.peak_rss_increase,
            "peak_rss_anon_increase": mem.peak_anon_increase, "rss_increase_after": mem.end["VmRSS"] - mem.base["VmRSS"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out(ap, __file__)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--_make", help=argparse.SUPPRESS)
    ap.add_argument("--_measure", help=argparse.SUPPRESS)
    ap.add_argument("--_packages", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._make:
        print(json.dumps(make(a, Path(a._make))))
        return
    if a._measure:
        print(json.dumps(measure(a, a._measure, json.loads(a._packages))))
        return

    shape = [f"--hidden={a.hidden}", f"--layers={a.layers}", f"--vocab={a.vocab}"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}

    def child(*args: str) -> dict:
        p = subprocess.run([sys.executable, __file__, *shape, *args], capture_output=True, text=True, env=env,
                           cwd=REPO)
        if p.returncode:
            raise SystemExit(p.stderr[-3000:])
        return json.loads(p.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory(prefix="restore_memory_") as tmp:
        packages = child(f"--_make={tmp}")
        rows = [child(f"--_measure={case}", f"--_packages={json.dumps(packages)}") for case in CASES]
        sizes = {w: Path(packages[w]).stat().st_size for w in ("file",)}
    bf16_bytes = packages["parameters"] * 2
    for r in rows:
        r["peak_rss_increase_over_bf16_bytes"] = round(r["peak_rss_increase"] / bf16_bytes, 3)
        r["peak_rss_anon_increase_over_bf16_bytes"] = round(r["peak_rss_anon_increase"] / bf16_bytes, 3)
    result = {"parameters": packages["parameters"], "bf16_weight_bytes": bf16_bytes,
              "fp32_package_bytes": sizes["file"], "shape": section(a), "bound": 1.3, "rows": rows}
    write_result(result, a.out, echo=True)


if __name__ == "__main__":
    main()
