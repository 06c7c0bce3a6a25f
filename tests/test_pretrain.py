"""pretrain + eval_ppl through the real runner on the small database (tests/conftest.py)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, SMALL, SMOKE, retro_run
from tests.in_process import check_bf16_result, compare_bf16_with_fp32, train_in_process

pytestmark = pytest.mark.slow

TRAIN_STAGES = "stages=[tokenizer,prepare_corpus,build_db,pretrain,eval_ppl]"
TRAIN = [
    TRAIN_STAGES,
    "model.seq_length=128",
    "pretrain.train_iters=8",
    "pretrain.micro_batch_size=2",
    "pretrain.global_batch_size=4",
    "pretrain.save_interval=4",
    "pretrain.log_interval=2",
    "pretrain.lr=2e-3",
    "pretrain.min_lr=2e-4",
    "pretrain.lr_warmup_iters=0",
]


def copy_db(small_db: Path, dst: Path) -> Path:
    shutil.copytree(small_db, dst, ignore=shutil.ignore_patterns("logs", "*.lock"))
    return dst


def losses(w: Path, name: str = "pretrain") -> list[float]:
    rows = [json.loads(line) for line in (w / "metrics" / f"{name}.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def trained(small_db, tmp_path_factory) -> Path:
    """Retro and its GPT twin, 8 iterations each, evaluated: the reference the other tests compare with."""
    w = copy_db(small_db, tmp_path_factory.mktemp("trained") / "w")
    p = retro_run(SMOKE, f"workdir={w}", *SMALL, *TRAIN, "pretrain.gpt_twin=true")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "skip  build_db" in p.stdout  # the copied database is reused
    return w


def test_checkpoints_metrics_and_schedule(trained):
    for name in ("pretrain", "pretrain_gpt_twin"):
        root = trained / "checkpoints" / name
        assert (root / "latest").read_text().strip() == "iter_0000008"
        assert sorted(p.name for p in root.iterdir()) == ["iter_0000004", "iter_0000008", "latest"]
        assert (root / "iter_0000008" / "metadata.json").is_file()
    rows = [json.loads(line) for line in (trained / "metrics" / "pretrain.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(math.isfinite(r["loss"]) for r in rows)
    lrs = [r["lr"] for r in rows]
    # cosine from 2e-3 (no warmup) towards 2e-4 over 8 iterations: lr of iteration i is the schedule at step i-1
    expected = [2e-4 + 0.5 * (2e-3 - 2e-4) * (1 + math.cos(math.pi * i / 8)) for i in range(8)]
    assert lrs == pytest.approx(expected, rel=1e-6)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert list((trained / "tensorboard" / "pretrain").glob("events.out.tfevents.*"))


def test_ppl_json_matches_a_direct_computation(trained):
    ppl = json.loads((trained / "eval" / "ppl.json").read_text())
    assert set(ppl) == {"valid", "test"}
    for split, row in ppl.items():
        assert set(row) == {"ppl", "ppl_no_retrieval", "ppl_gpt_twin", "tokens", "samples", "database_version"}
        assert row["database_version"] == 1
        assert row["tokens"] == row["samples"] * 128
        assert 1.0 < row["ppl"] < 1000 and 1.0 < row["ppl_gpt_twin"] < 1000

    # Recompute the test split's perplexity with plain torch from the checkpoint's weights.
    import torch

    from retro_toolkit.collections.retro import checkpointing as ckpt
    from retro_toolkit.collections.retro.engine import build, dataset
    from retro_toolkit.recipe import load_recipe

    recipe = load_recipe(str(trained / "recipe.resolved.yaml"))
    model, _, _ = build(recipe, "retro")
    ckpt.load_weights(ckpt.latest(trained / "checkpoints" / "pretrain"), model)
    model.eval()
    data = dataset(recipe, "test", "retro", None, shuffle=False)
    data.num_samples = data.windows
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(len(data)):
            s = data[i]
            logits = model(torch.from_numpy(s["tokens"])[None], torch.from_numpy(s["neighbor_tokens"])[None])
            nll += torch.nn.functional.cross_entropy(logits[0].double(), torch.from_numpy(s["labels"]),
                                                     reduction="sum").item()
            n += len(s["labels"])
    assert n == ppl["test"]["tokens"]
    assert math.exp(nll / n) == pytest.approx(ppl["test"]["ppl"], rel=1e-5)


def test_torchrun_data_parallel_matches_one_process(trained, dp2):
    w = dp2
    assert "dp 2, tp 1, micro 2, accumulation 1" in (w / "logs" / "pretrain.rank0.log").read_text()
    # 2 ranks x 1 micro-batch of 2 == 1 rank x 2 micro-batches of 2: the same global batches
    assert losses(w) == pytest.approx(losses(trained), rel=1e-5)


@pytest.mark.parametrize("parallel", ["dp2_distributed_optimizer", "tp2"])
def test_torchrun_bf16_trains_like_fp32(trained, tmp_path, parallel):
    """The bf16 checks of test_bf16_mixed_precision_trains_like_fp32_on_cpu in every rank of
    two: data parallel with megatron-core's distributed optimizer (bf16 reduce-scatter and
    all-gather on gloo), and tensor parallel."""
    overrides = {"dp2_distributed_optimizer": ["pretrain.use_distributed_optimizer=true",
                                               "sft.use_distributed_optimizer=true"],
                 "tp2": ["model.tensor_model_parallel_size=2"]}[parallel]
    overrides += ["executor.type=torchrun", "executor.nproc_per_node=2"]  # as the recipe of such a run says
    script = REPO / "tests" / "dist_scripts" / "bf16_train.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(trained / "recipe.resolved.yaml"), str(tmp_path), *overrides],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    optimizer = "DistributedOptimizer" if parallel.startswith("dp2") else "Float16OptimizerWithFloat16Params"
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        check_bf16_result(result["pretrain"], 20, optimizer)
        check_bf16_result(result["sft"], 10, optimizer)


def test_torchrun_bf16_distributed_optimizer_resumes_exactly(small_db, tmp_path, run_cli):
    """bf16 + distributed optimizer on two ranks through the stage: a run resumed from its
    iteration-4 checkpoint (optimizer shards, Adam's step) repeats the uninterrupted losses."""
    w = copy_db(small_db, tmp_path / "dp_bf16")
    args = [SMOKE, f"workdir={w}", *SMALL, *TRAIN, "stages=[tokenizer,prepare_corpus,build_db,pretrain]",
            "pretrain.bf16=true", "pretrain.use_distributed_optimizer=true", "executor=torchrun",
            "executor.nproc_per_node=2"]
    p = run_cli(*args)
    assert p.returncode == 0, p.stdout + p.stderr
    whole = losses(w)
    assert len(whole) == 8 and all(math.isfinite(x) for x in whole)
    root = w / "checkpoints" / "pretrain"
    shutil.rmtree(root / "iter_0000008")
    (root / "latest").write_text("iter_0000004\n")
    (w / "stages" / "pretrain.json").unlink()
    p = run_cli(*args)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"resuming from {root / 'iter_0000004'}" in (w / "logs" / "pretrain.rank0.log").read_text()
    assert losses(w) == whole


def test_torchrun_tensor_parallel_trains(trained, small_db, tmp_path, run_cli):
    w = copy_db(small_db, tmp_path / "tp")
    p = run_cli(SMOKE, f"workdir={w}", *SMALL, *TRAIN, "executor=torchrun", "executor.nproc_per_node=2",
                "model.tensor_model_parallel_size=2")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "dp 1, tp 2" in (w / "logs" / "pretrain.rank0.log").read_text()
    tp = losses(w)
    assert len(tp) == 8 and all(math.isfinite(x) for x in tp) and tp[-1] < tp[0]
    ppl = json.loads((w / "eval" / "ppl.json").read_text())
    assert math.isfinite(ppl["test"]["ppl"])


def test_kill_after_a_checkpoint_then_rerun_gives_identical_losses(small_db, tmp_path):
    # Dropout on, so the resumed run must also restore the RNG streams to match.
    args = [*SMALL, *TRAIN, "stages=[tokenizer,prepare_corpus,build_db,pretrain]", "pretrain.train_iters=24",
            "model.hidden_dropout=0.1", "model.attention_dropout=0.1", "model.encoder_hidden_dropout=0.1"]
    ref = copy_db(small_db, tmp_path / "ref")
    p = retro_run(SMOKE, f"workdir={ref}", *args)
    assert p.returncode == 0, p.stdout + p.stderr

    w = copy_db(small_db, tmp_path / "killed")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen([sys.executable, "-m", "retro_toolkit", SMOKE, f"workdir={w}", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = w / "checkpoints" / "pretrain" / "latest"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not latest.exists():
        time.sleep(0.02)
    import psutil

    # The runner, its job, and the job's children (dist_checkpointing's writer-queue manager).
    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    killed_at = latest.read_text().strip()
    assert killed_at != "iter_0000024", "the run finished before it could be killed"
    assert not (w / "stages" / "pretrain.json").exists()

    p = retro_run(SMOKE, f"workdir={w}", *args)
    assert p.returncode == 0, p.stdout + p.stderr
    log = (w / "logs" / "pretrain.rank0.log").read_text()
    assert f"resuming from {w / 'checkpoints' / 'pretrain' / killed_at}" in log
    assert losses(w) == losses(ref)  # bit-identical, every iteration


def test_changed_settings_refuse_to_resume_and_resume_false_starts_over(trained, tmp_path, run_cli):
    w = tmp_path / "w"
    shutil.copytree(trained, w, ignore=shutil.ignore_patterns("logs", "*.lock"))
    p = run_cli(SMOKE, f"workdir={w}", *SMALL, *TRAIN, "pretrain.gpt_twin=true", "pretrain.lr=1e-3")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "pretrain.lr: checkpoint 0.002 vs recipe 0.001" in p.stderr
    assert "pretrain.resume=false" in p.stderr
    assert (w / "checkpoints" / "pretrain" / "iter_0000008" / "metadata.json").is_file()  # nothing lost

    # Another sequence length and seed on the same database: both train, neighbours are not rebuilt.
    p = run_cli(SMOKE, f"workdir={w}", *SMALL, *TRAIN, "model.seq_length=64", "seed=7", "pretrain.resume=false",
                "eval_ppl.splits=[test]")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "skip  build_db" in p.stdout
    assert json.loads((w / "stages" / "build_db.json").read_text()) == json.loads(
        (trained / "stages" / "build_db.json").read_text())
    assert json.loads((w / "eval" / "ppl.json").read_text())["test"]["tokens"] % 64 == 0
    assert losses(w) != losses(trained)


def gpt_without_database(small_db: Path, w: Path) -> Path:
    """A GPT pretrained (4 iterations) in a work directory with the corpus and no database."""
    (w / "stages").mkdir(parents=True)
    for part in ("tokenizer", "corpus"):
        shutil.copytree(small_db / part, w / part)
    for stage in ("tokenizer", "prepare_corpus"):
        shutil.copy(small_db / "stages" / f"{stage}.json", w / "stages")
    train = [t for t in TRAIN if not t.startswith("stages=")] + ["pretrain.train_iters=4"]
    p = retro_run(SMOKE, f"workdir={w}", *SMALL, *train, "model.arch=gpt", "model.cca_layers=[]",
                  "stages=[tokenizer,prepare_corpus,pretrain]")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "skip  prepare_corpus" in p.stdout and "build_db" not in p.stdout
    assert not (w / "db").exists()
    return w / "checkpoints" / "pretrain"


def test_init_from_gpt_loads_the_decoder_freeze_keeps_it_and_cca_zero_init_starts_as_the_twin(
        small_db, tmp_path, run_cli):
    import torch

    from retro_toolkit.collections.retro import checkpointing as ckpt
    from retro_toolkit.collections.retro.engine import build
    from retro_toolkit.recipe import load_recipe

    gpt_ckpt = gpt_without_database(small_db, tmp_path / "gpt")
    w = copy_db(small_db, tmp_path / "fit")
    p = run_cli(SMOKE, f"workdir={w}", *SMALL, *TRAIN, "pretrain.train_iters=2", f"pretrain.init_from={gpt_ckpt}",
                "pretrain.freeze_decoder=true", "pretrain.gpt_twin=true", "model.cca_zero_init=true",
                "stages=[tokenizer,prepare_corpus,build_db,pretrain]")
    assert p.returncode == 0, p.stdout + p.stderr
    log = (w / "logs" / "pretrain.rank0.log").read_text()
    new = [line.split("new: ")[1] for line in log.splitlines() if "  new: " in line]
    assert new and all(".cross_attention." in n or ".pre_cross_attn_layernorm." in n for n in new)
    assert any(".encoder." in n for n in new)
    # The same decoder, and CCA's output exactly 0 until the first update: the same first loss.
    assert losses(w)[0] == losses(w, "pretrain_gpt_twin")[0]

    recipe = load_recipe(str(w / "recipe.resolved.yaml"))
    retro, _, _ = build(recipe, "retro")
    gpt, _, _ = build(recipe, "gpt")
    ckpt.load_weights(ckpt.latest(w / "checkpoints" / "pretrain"), retro)
    ckpt.load_weights(ckpt.latest(gpt_ckpt), gpt)
    rs, gs = retro.state_dict(), gpt.state_dict()
    params = {k for k in set(rs) - set(gs) if not k.endswith("._extra_state")}
    assert sorted(params) == sorted(new)  # exactly the new parameters
    for name, t in gs.items():
        if isinstance(t, torch.Tensor):
            assert torch.equal(rs[name], t), name  # decoder loaded and frozen: bit-identical after training
    proj = [t for n, t in rs.items() if n.endswith("cross_attention.attention.linear_proj.weight")]
    assert proj and all(t.abs().sum() > 0 for t in proj)  # trained away from its zero start


def test_bad_init_from_and_other_model_size_are_clear_errors(trained, small_db, tmp_path, run_cli):
    w = tmp_path / "bad"
    p = run_cli(SMOKE, f"workdir={w}", *SMALL, *TRAIN, f"pretrain.init_from={tmp_path / 'nope'}", "--dry-run")
    assert p.returncode == 2
    assert "pretrain.init_from" in p.stderr and "does not exist" in p.stderr

    w = copy_db(small_db, tmp_path / "size")
    twin = trained / "checkpoints" / "pretrain_gpt_twin"
    p = run_cli(SMOKE, f"workdir={w}", *SMALL, *TRAIN, f"pretrain.init_from={twin}", "model.hidden_size=32",
                "model.ffn_hidden_size=64")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "was written for another model (ffn_hidden_size: checkpoint 128 vs recipe 64, hidden_size: checkpoint 64 vs recipe 32)" in p.stderr


def test_activation_recompute_gives_the_same_losses(trained, tmp_path):
    from retro_toolkit.recipe import load_recipe

    runs = {}
    for recompute in (False, True):
        recipe = load_recipe(str(trained / "recipe.resolved.yaml"), [f"pretrain.recompute_activations={recompute}"])
        model, _, runs[recompute] = train_in_process(recipe, tmp_path / str(recompute), 3)
        assert model.config.recompute_granularity == ("full" if recompute else None)
    assert len(runs[True]) == 3 and runs[True] == runs[False]


def test_weight_gradients_accumulated_in_the_ddp_buffer_train_alike(trained, tmp_path):
    """gradient_accumulation_fusion (wgrad.py's torch GEMM on CPU) against the backward hook's add."""
    import torch

    from retro_toolkit.recipe import load_recipe

    recipe = load_recipe(str(trained / "recipe.resolved.yaml"))
    runs, grads = {}, {}
    for fused in (False, True):
        model, _, runs[fused] = train_in_process(recipe, tmp_path / str(fused), 3,
                                                 {"gradient_accumulation_fusion": fused})
        grads[fused] = {n: p.main_grad.clone() for n, p in model.named_parameters()}
    assert runs[True][0] == runs[False][0] and runs[True] == pytest.approx(runs[False], rel=1e-5)
    fc1 = next(n for n in grads[True] if n.endswith("mlp.linear_fc1.weight"))
    assert grads[True][fc1].abs().sum() > 0  # the buffer holds the layer's gradient, counted once
    for n in grads[True]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("stage,iters", [("pretrain", 20), ("sft", 10)])
def test_bf16_mixed_precision_trains_like_fp32_on_cpu(trained, tmp_path, stage, iters):
    """megatron-core's bf16 path (bf16 weights and activations, fp32 main grads in the DDP
    buffer, fp32 main weights in the optimizer), with the weight-gradient GEMM accumulating
    into the buffer (apex's kernel on GPUs, wgrad.py here) and without it."""
    result = compare_bf16_with_fp32(str(trained / "recipe.resolved.yaml"), tmp_path, stage, iters)
    check_bf16_result(result, iters)


def test_init_from_a_retro_checkpoint_is_refused(trained, small_db, tmp_path, run_cli):
    w = copy_db(small_db, tmp_path / "retro_init")
    p = run_cli(SMOKE, f"workdir={w}", *SMALL, *TRAIN, f"pretrain.init_from={trained / 'checkpoints' / 'pretrain'}",
                "stages=[tokenizer,prepare_corpus,build_db,pretrain]")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "is a 'retro' checkpoint; init_from starts Retro from a GPT (twin) checkpoint" in p.stderr
    assert not (w / "checkpoints" / "pretrain").exists()


def test_retrieval_lr_mult_scales_only_cross_attention_and_encoder(trained):
    from retro_toolkit.collections.retro import engine, training
    from retro_toolkit.collections.retro import pretrain as pt
    from retro_toolkit.collections.retro.checkpointing import is_retrieval_param
    from retro_toolkit.recipe import load_recipe
    from retro_toolkit.runner.manifest import stage_config

    recipe = load_recipe(str(trained / "recipe.resolved.yaml"))
    assert "retrieval_lr_mult" not in stage_config(recipe, "pretrain")["pretrain"]  # old work dirs stay current
    assert not any("retrieval_lr_mult" in k for k in pt.resume_settings(recipe, {}))  # and old checkpoints resume
    recipe = load_recipe(str(trained / "recipe.resolved.yaml"), ["pretrain.retrieval_lr_mult=10"])
    assert stage_config(recipe, "pretrain")["pretrain"]["retrieval_lr_mult"] == 10.0
    assert pt.resume_settings(recipe, {})["pretrain.retrieval_lr_mult"] == 10.0

    model, config, _ = engine.build(recipe, "retro", training.precision_overrides(False, False))
    names = {id(p): n for n, p in model.named_parameters()}
    ddp, opt, sched = training.wrap_and_optimizer(model, recipe.pretrain, config)
    for _ in range(3):
        sched.step(1)
    groups = [g for o in getattr(opt, "chained_optimizers", [opt]) for g in o.optimizer.param_groups if g["params"]]
    base = sched.get_lr({})  # the schedule's rate at step 3 for a group without overrides
    assert recipe.pretrain.min_lr < base < recipe.pretrain.lr
    seen = {"retrieval": 0, "decoder": 0}
    for g in groups:
        kinds = {is_retrieval_param(names[id(p)]) for p in g["params"]}
        assert len(kinds) == 1, "a group mixes retrieval and decoder parameters"
        retrieval = kinds.pop()
        assert g["lr"] == pytest.approx(base * (10 if retrieval else 1), rel=1e-9)
        for p in g["params"]:  # megatron-core's standard rule still holds: no decay on biases and norms
            assert (g["weight_decay"] == 0) == (p.dim() == 1), names[id(p)]
            seen["retrieval" if retrieval else "decoder"] += 1
    assert seen["retrieval"] > 0 and seen["decoder"] > 0
    assert seen["retrieval"] == sum(is_retrieval_param(n) for n in names.values())
