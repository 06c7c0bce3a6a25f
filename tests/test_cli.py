"""The `retro-run` command line: subcommands, exit codes, and bad input (exit 2, no traceback,
nothing written to the work directory)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, SMOKE


def test_ls_lists_recipes_and_pieces(run_cli):
    p = run_cli("ls")
    assert p.returncode == 0, p.stderr
    assert "smoke" in p.stdout and "Smoke run on one CPU" in p.stdout
    for piece in ("retro_tiny", "slurm", "torchrun", "pydoc"):
        assert piece in p.stdout


def test_ls_into_a_closed_pipe_stops_quietly():
    """`retro-run ls | head -1`: the reader leaves early; no traceback, SIGPIPE's exit status."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: the first write fails with EPIPE
    try:
        p = subprocess.run([sys.executable, "-m", "retro_toolkit", "ls"], stdout=write_end, stderr=subprocess.PIPE,
                           text=True, timeout=120)
    finally:
        os.close(write_end)
    assert p.returncode == 141, p.stderr
    assert "Traceback" not in p.stderr and "BrokenPipeError" not in p.stderr


def test_show_prints_resolved_yaml(run_cli, tmp_path):
    p = run_cli("show", SMOKE, "executor=torchrun", f"workdir={tmp_path}/w")
    assert p.returncode == 0, p.stderr
    shown = yaml.safe_load(p.stdout)
    assert shown["executor"] == {"type": "torchrun", "nproc_per_node": 2, "distributed_timeout_s": 600, "env": {},
                                 "stages": {}}
    assert shown["workdir"] == f"{tmp_path}/w"
    assert not (tmp_path / "w").exists()


def test_validate_ok(run_cli):
    p = run_cli("validate", SMOKE)
    assert p.returncode == 0, p.stderr
    assert "ok" in p.stdout


def test_help_lists_stages_and_examples(run_cli):
    p = run_cli("--help")
    assert p.returncode == 0
    for word in ("prepare_corpus", "executor=slurm", "--dry-run", "Exit codes"):
        assert word in p.stdout


BOTH = ("run", "validate")
BAD_INPUT = [
    (BOTH, ["tokenizer.vocab_sise=3"], "Did you mean 'tokenizer.vocab_size'?"),
    (BOTH, ["tokenizer.vocab_size=abc"], "expected int"),
    (BOTH, ["executor=nosuch"], "unknown executor 'nosuch'"),
    (BOTH, ["stages=[tokenizer,prepare_corpus,bogus]"], "'stages[2]' = 'bogus' is not one of"),
    (("run",), ["--stages", "prepare_corpuss"], "unknown stage 'prepare_corpuss' in --stages. Did you mean 'prepare_corpus'?"),
    (("run",), ["stages=[tokenizer]", "--force", "export"], "stage 'export' in --force is not one of this recipe's stages"),
    (BOTH, ["stages=[tokenizer,prepare_corpus,export]"], "stage 'export' needs stage 'pretrain'"),
    (BOTH, ["stages=[tokenizer,prepare_corpus,build_db,pretrain,export]", "export.checkpoint=sft"],
     "'export.checkpoint' is sft but the recipe does not run the sft stage"),
    (BOTH, ["stages=[tokenizer,build_db]"], "stage 'build_db' needs stage 'prepare_corpus'"),
    (BOTH, ["stages=[tokenizer,prepare_corpus,pretrain]"],
     "stage 'pretrain' needs stage 'build_db' (a Retro model retrieves from its database; model.arch=gpt trains without one)"),
    (BOTH, ["retrieval.embedder.path=/nonexistent/bert"], "retrieval.embedder.path: /nonexistent/bert is not a Hugging Face model folder"),
    (BOTH, ["data.split_by=pasage"], "'data.split_by' = 'pasage' is not one of document, passage. Did you mean 'passage'?"),
    (BOTH, ["retrieval.k_query=1"], "retrieval.k_query (1) must be at least model.num_neighbors (2)"),
    (BOTH, ["stages=[prepare_corpus]"], "stage 'prepare_corpus' needs stage 'tokenizer'"),
    (("validate",), ["retrieval.index.memory_gb=0"], "'retrieval.index.memory_gb' must be above 0 (GiB), not 0"),
    (("validate",), ["retrieval.keep_embeddings=false", "retrieval.validate_fraction=0.1"],
     "retrieval.validate_fraction compares stored embedding blocks, and retrieval.keep_embeddings is false"),
    (BOTH, ["data.sources=[{path: /nonexistent/corpus.jsonl}]"], "data.sources[0].path: corpus path /nonexistent/corpus.jsonl does not exist"),
    (BOTH, ["tokenizer.model=/nonexistent/t.model"], "tokenizer.model: /nonexistent/t.model does not exist. Give a SentencePiece .model, a Hugging Face tokenizer.json"),
]


@pytest.mark.parametrize(
    "command, args, message",
    [(c, a, m) for commands, a, m in BAD_INPUT for c in commands],
)
def test_bad_input_exit_2_one_message_nothing_written(run_cli, tmp_path, command, args, message):
    workdir = tmp_path / "w"
    p = run_cli(command, SMOKE, f"workdir={workdir}", *args)
    assert p.returncode == 2, p.stdout + p.stderr
    assert message in p.stderr
    assert p.stderr.startswith("error: ") and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not workdir.exists()


def test_missing_recipe_file_exit_2(run_cli, tmp_path):
    p = run_cli(str(tmp_path / "nope.yaml"))
    assert p.returncode == 2
    assert "recipe file not found" in p.stderr and "Traceback" not in p.stderr


def test_dry_run_local_writes_nothing(run_cli, tmp_path):
    p = run_cli(SMOKE, f"workdir={tmp_path}/w", "--dry-run")
    assert p.returncode == 0, p.stderr
    assert "run   tokenizer" in p.stdout and "run   build_db" in p.stdout
    assert not (tmp_path / "w").exists()


def test_dry_run_slurm_prints_sbatch_scripts(run_cli, tmp_path):
    p = run_cli(SMOKE, f"workdir={tmp_path}/w", "--dry-run", "executor=slurm", "executor.account=abc",
                "executor.partition=gpu", "executor.nodes=2", "executor.ntasks_per_node=4",
                "executor.gpus_per_node=4", "executor.time=02:30:00", "pretrain.global_batch_size=32",
                "sft.global_batch_size=32")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("#!/bin/bash") == 8  # one script per stage
    for line in ("#SBATCH --account=abc", "#SBATCH --partition=gpu", "#SBATCH --nodes=2",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4", "#SBATCH --time=02:30:00",
                 "-m retro_toolkit.executors.node_launch 4 prepare_corpus", "-m retro_toolkit.executors.node_launch 4 eval_ppl",
                 "-m retro_toolkit.executors.node_launch 4 eval_qa"):
        assert line in p.stdout, line
    assert "dry run: nothing was submitted." in p.stdout
    assert not (tmp_path / "w").exists()


def test_show_model_counts_without_weights(run_cli):
    p = run_cli("show-model", "retro_843m")
    assert p.returncode == 0, p.stderr
    assert "877,518,848" in p.stdout and "chunked cross-attention" in p.stdout
    p = run_cli("show-model", "retro_tiny", "--vocab-size", "4000")
    assert p.returncode == 0 and "CCA layers (1-based, 1): 2" in p.stdout, p.stdout + p.stderr
    p = run_cli("show-model", "nosuch")
    assert p.returncode == 2 and "neither a file nor a piece" in p.stderr


def test_detach_needs_slurm_and_status_needs_a_workdir(tmp_path, run_cli):
    p = run_cli(SMOKE, f"workdir={tmp_path / 'w'}", "--detach")
    assert p.returncode == 2 and "--detach queues the stages as Slurm jobs" in p.stderr
    assert not (tmp_path / "w").exists()
    p = run_cli("status", str(tmp_path))
    assert p.returncode == 2 and "has no recipe.resolved.yaml" in p.stderr


def test_validate_imports_no_torch():
    """Resolving and checking a recipe stays light: a login node or laptop without torch can do it."""
    code = ("import sys\nfrom retro_toolkit.cli import main\n"
            "rc = main(['validate', 'recipes/smoke.yaml'])\n"
            "print(rc, sorted(m for m in ('torch', 'megatron', 'faiss', 'transformers') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "0 []"
