"""recipes/single_gpu.yaml: valid as shipped, and its documented CPU variant runs every stage in bf16."""

from __future__ import annotations

import json
import math
import shlex

import pytest
import torch

from tests.conftest import REPO, retro_run

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")

RECIPE = REPO / "recipes" / "single_gpu.yaml"


def documented_cpu_command() -> list[str]:
    """The overrides of the `retro-run recipes/single_gpu.yaml ...` command in the recipe's header."""
    lines = RECIPE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#   retro-run recipes/single_gpu.yaml model="))
    command = []
    for line in lines[start:]:
        part = line.lstrip("#").strip()
        command.append(part.rstrip("\\").strip())
        if not part.endswith("\\"):
            break
    words = shlex.split(" ".join(command))
    assert words[:2] == ["retro-run", "recipes/single_gpu.yaml"]
    return words[2:]


def test_the_recipe_validates_and_trains_in_bf16_on_one_local_process(run_cli):
    p = run_cli("validate", str(RECIPE))
    assert p.returncode == 0, p.stdout + p.stderr
    p = run_cli("show", str(RECIPE))
    assert p.returncode == 0, p.stderr
    import yaml

    shown = yaml.safe_load(p.stdout)
    assert shown["executor"]["type"] == "local"
    assert shown["pretrain"]["bf16"] is True and shown["sft"]["bf16"] is True
    assert shown["stages"] == ["tokenizer", "prepare_corpus", "build_db", "pretrain", "eval_ppl", "sft", "eval_qa",
                               "export"]
    assert [s["path"] for s in shown["data"]["sources"]] == ["builtin:transformers-modeling", "builtin:pydoc"]


@pytest.mark.slow
def test_the_documented_cpu_variant_runs_every_stage_in_bf16(tmp_path):
    from retro_toolkit.checkpoint import nemo
    from retro_toolkit.collections.retro import checkpointing as ckpt

    w = tmp_path / "w"
    p = retro_run(str(RECIPE), *documented_cpu_command(), f"workdir={w}")
    assert p.returncode == 0, p.stdout + p.stderr

    for stage, iters in (("pretrain", 20), ("sft", 10)):
        rows = [json.loads(x) for x in (w / "metrics" / f"{stage}.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in rows] == list(range(1, iters + 1))
        assert all(math.isfinite(r["loss"]) for r in rows)
        assert ckpt.saved_dtype(ckpt.latest(w / "checkpoints" / stage)) == torch.bfloat16
    # Evaluation builds the model in the dtype its weights were trained in.
    assert "weights from checkpoints/pretrain/iter_0000020 (bfloat16)" in (w / "logs" / "eval_ppl.rank0.log").read_text()
    assert "(bfloat16)" in (w / "logs" / "eval_qa.rank0.log").read_text()
    ppl = json.loads((w / "eval" / "ppl.json").read_text())
    assert all(math.isfinite(row["ppl"]) and math.isfinite(row["ppl_no_retrieval"]) for row in ppl.values())
    assert json.loads((w / "eval" / "qa" / "scores.json").read_text())["smoke"]["n"] == 20

    # The package holds the bf16 weights; restored as saved and as fp32, it computes the same.
    package = w / "export" / "single_gpu.nemo"
    as_saved = nemo.restore(package, device="cpu")
    as_fp32 = nemo.restore(package, device="cpu", dtype=torch.float32)
    assert {q.dtype for q in as_saved.model.parameters()} == {torch.bfloat16}
    assert {q.dtype for q in as_fp32.model.parameters()} == {torch.float32}
    for a, b in zip(as_saved.model.parameters(), as_fp32.model.parameters()):
        assert torch.equal(a.float(), b)  # bf16 -> fp32 is exact
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 1000, (1, 128), generator=g)
    nb = torch.randint(4, 1000, (1, 2, 2, 128), generator=g)
    nb[0, 1, 0] = -1
    with torch.no_grad():
        low, high = (pkg.model(tokens, nb, runtime_gather_output=True).float() for pkg in (as_saved, as_fp32))
    assert torch.isfinite(low).all()
    assert (low - high).abs().max() < 0.05 * high.abs().max()  # bf16 activations, fp32 reference
