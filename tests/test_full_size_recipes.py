"""The full-size recipes (retro_843m, instructretro_2b/8b/22b/48b) resolve, validate and
render an sbatch script per stage with the resources, dependencies and parallel sizes the
table below expects (the table is the spec; the recipes must agree with it).

Their inputs live on a cluster, so the test lays out a data root with stand-in files at
the paths the recipes name (validate checks they exist); nothing is run or submitted.
"""

from __future__ import annotations

import re

import pytest
import yaml
from omegaconf import OmegaConf

from retro_toolkit.errors import UserError
from retro_toolkit.recipe import load_recipe
from tests.conftest import REPO

RECIPES = ["retro_843m", "instructretro_2b", "instructretro_8b", "instructretro_22b", "instructretro_48b"]
PLACEHOLDERS = "executor.account, executor.partition, executor.container_image, executor.container_mounts[0], paths.data"
IMAGE = "registry.example.com/retro-toolkit:0.1"

# recipe: (TP, global batch, seq, {stage: (nodes, tasks per node, GPUs per node or None, time)})
GPU8 = 8
EXPECTED = {
    "retro_843m": (1, 256, 2048, {
        "tokenizer": (1, 1, None, "00:30:00"), "prepare_corpus": (2, 32, None, "12:00:00"),
        "build_db": (8, 8, GPU8, "24:00:00"), "pretrain": (4, 8, GPU8, "48:00:00"),
        "eval_ppl": (1, 8, GPU8, "02:00:00")}),
    "instructretro_2b": (1, 256, 4096, {"pretrain": (4, 8, GPU8, "48:00:00"), "sft": (1, 8, GPU8, "08:00:00"),
                                        "eval_qa": (1, 1, 1, "08:00:00")}),
    "instructretro_8b": (4, 512, 4096, {"pretrain": (8, 8, GPU8, "48:00:00"), "sft": (2, 8, GPU8, "08:00:00"),
                                        "eval_qa": (1, 4, 4, "08:00:00")}),
    "instructretro_22b": (8, 512, 4096, {"pretrain": (16, 8, GPU8, "48:00:00"), "sft": (2, 8, GPU8, "08:00:00"),
                                         "eval_qa": (1, 8, GPU8, "08:00:00")}),
    "instructretro_48b": (8, 768, 4096, {
        "tokenizer": (1, 1, None, "00:30:00"), "prepare_corpus": (8, 32, None, "24:00:00"),
        "build_db": (32, 8, GPU8, "48:00:00"), "pretrain": (32, 8, GPU8, "48:00:00"),
        "eval_ppl": (1, 8, GPU8, "04:00:00"), "sft": (4, 8, GPU8, "08:00:00"), "eval_qa": (1, 8, GPU8, "08:00:00"),
        "export": (1, 1, None, "04:00:00")}),
}
UPSTREAM = {"prepare_corpus": ["tokenizer"], "build_db": ["prepare_corpus"], "pretrain": ["build_db"],
            "eval_ppl": ["pretrain"], "sft": ["pretrain"], "eval_qa": ["sft"], "export": ["pretrain", "sft"]}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """What paths.data holds on a cluster, as stand-in files (only their existence is checked, and
    that the tokenizer loads: a small real SentencePiece model stands in for the 256K one)."""
    from retro_toolkit.collections.text.sentencepiece_tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("cluster") / "data"
    root.mkdir()
    train_sentencepiece(iter(["a stand-in corpus for a tokenizer"] * 20), root / "tokenizer.model", 300, "bpe", 1.0,
                        10000, True, 1)
    for rel in ("pretrain.jsonl", "retrieval_db.jsonl", "corpus.jsonl", "bert-large-cased/config.json"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text('{"text": "stand-in"}\n' if rel.endswith(".jsonl") else "{}\n")
    for gpt in ("gpt_2b", "gpt_8b", "gpt_22b", "gpt_43b"):
        (root / gpt).mkdir()
    sft = yaml.safe_load((REPO / "yaml" / "sft" / "open_inst.yaml").read_text())["datasets"]
    qa = yaml.safe_load((REPO / "yaml" / "eval_qa" / "instructretro.yaml").read_text())["tasks"]
    for item in sft + qa:
        f = root / item["path"].replace("${paths.data}/", "")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("{}\n")
    return root


def _cluster(root) -> list[str]:
    # The data root is mounted at its own path: the jobs open every path as the recipe names it.
    return [f"paths.data={root}", "executor.account=acct", "executor.partition=gpu",
            f"executor.container_image={IMAGE}", f"executor.container_mounts=[/lustre:/lustre, {root}:{root}]"]


# validate checks that this machine can submit: through an ssh tunnel, sbatch is the login node's.
SSH = ["executor.tunnel.type=ssh", "executor.tunnel.host=login.cluster", "executor.tunnel.job_dir=/lustre/jobs"]


@pytest.mark.parametrize("name", RECIPES)
def test_validate_names_every_placeholder_then_passes(name, data_root, run_cli):
    p = run_cli("validate", name)
    assert p.returncode == 2 and f"recipe keys required but not set: {PLACEHOLDERS}." in p.stderr, p.stderr
    p = run_cli("validate", name, *_cluster(data_root), *SSH)
    assert p.returncode == 0, p.stderr
    assert "executor slurm" in p.stdout


def _scripts(stdout: str) -> dict[str, str]:
    parts = re.split(r"^# ---- sbatch script for stage (\w+) ----$", stdout, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.mark.parametrize("name", RECIPES)
def test_dry_run_renders_each_stage_with_its_resources(name, data_root, run_cli):
    tp, batch, seq, resources = EXPECTED[name]
    p = run_cli(name, *_cluster(data_root), "--dry-run")
    assert p.returncode == 0, p.stderr
    scripts = _scripts(p.stdout)
    shown = OmegaConf.to_container(load_recipe(name, _cluster(data_root)))
    assert list(scripts) == shown["stages"]  # every stage, in pipeline order
    assert shown["model"]["tensor_model_parallel_size"] == tp and shown["model"]["seq_length"] == seq
    assert shown["pretrain"]["global_batch_size"] == batch and shown["pretrain"]["bf16"] is True
    workdir = f"{data_root}/runs/{name}"
    assert shown["workdir"] == workdir
    for stage, text in scripts.items():
        assert "#SBATCH --account=acct" in text and "#SBATCH --partition=gpu" in text, stage
        assert f"#SBATCH --job-name=retro-{name}-{stage}" in text
        assert f"--container-image {IMAGE}" in text and f"--container-mounts /lustre:/lustre,{data_root}:{data_root}" in text
        assert re.search(rf"-m retro_toolkit\.(launch|executors\.node_launch \d+) {stage} {workdir}/recipe\.resolved\.yaml",
                         text), stage
        # Training jobs get SIGTERM 10 minutes before their time limit, and torchrun waits that
        # long for saving workers; the other stages have nothing to save.
        assert ("#SBATCH --signal=TERM@600\n" in text) == (stage in ("pretrain", "sft")), stage
        assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600\n" in text
        deps = re.findall(r"^#SBATCH --dependency='afterok:(.*)'$", text, flags=re.M)
        want = [d for d in UPSTREAM.get(stage, []) if d in shown["stages"]]
        assert deps == ([":".join(f"<{d}>" for d in want)] if want else []), (stage, deps)
        assert ("#SBATCH --kill-on-invalid-dep=yes" in text) == bool(want), stage
    for stage, (nodes, tasks, gpus, time) in resources.items():
        text = scripts[stage]
        assert f"#SBATCH --nodes={nodes}\n" in text and f"#SBATCH --time={time}\n" in text, stage
        assert (f"#SBATCH --gpus-per-node={gpus}\n" in text) if gpus else ("--gpus-per-node" not in text), stage
        if nodes * tasks > 1:  # torchrun: one Slurm task per node, rendezvous on the first node
            assert "#SBATCH --ntasks-per-node=1\n" in text
            # each node's task starts its torchrun, pointed at the first node's address
            assert f" python -m retro_toolkit.executors.node_launch {tasks} {stage} " in text, stage
        else:
            assert "torchrun" not in text and "#SBATCH --ntasks-per-node=1\n" in text
        if stage in ("pretrain", "sft", "eval_ppl", "eval_qa"):
            line = next(x for x in p.stdout.splitlines() if x.strip().startswith(f"run   {stage} "))
            assert line.endswith(f"TP {tp} x DP {nodes * tasks // tp}"), line
    assert "dry run: nothing was submitted." in p.stdout
    assert not (data_root / "runs").exists()


def test_a_stage_size_that_breaks_the_batch_or_tp_is_refused_up_front(data_root, run_cli):
    p = run_cli("validate", "instructretro_48b", *_cluster(data_root), "executor.stages.pretrain.nodes=5")
    assert p.returncode == 2
    assert ("pretrain.global_batch_size (768) must be a multiple of pretrain.micro_batch_size (1) x "
            "data-parallel ranks (5 = 40 processes / tensor parallel 8) = 5.") in p.stderr
    p = run_cli("validate", "instructretro_48b", *_cluster(data_root), "executor.stages.eval_qa.ntasks_per_node=4")
    assert p.returncode == 2 and "stage 'eval_qa' starts 4 process(es)" in p.stderr
    assert "model.tensor_model_parallel_size = 8 does not divide" in p.stderr


@pytest.mark.parametrize("override, message", [
    ("executor.stages.pretrian={nodes: 2}", "recipe key 'executor.stages.pretrian' names no stage. Did you mean 'pretrain'?"),
    ("executor.stages.pretrain={gpus: 2}", "recipe key 'executor.stages.pretrain.gpus' cannot be set per stage. "
                                           "Did you mean 'executor.stages.pretrain.gpus_per_node'?"),
    ("executor.stages.pretrain={python: /x}", "'executor.stages.pretrain.python' cannot be set per stage "
                                              "(one setting for every stage)"),
    ("executor.stages.pretrain={nodes: two}", "recipe key 'executor.stages.pretrain.nodes' has the wrong type"),
    ("executor.stages.pretrain={nodes: 0}", "recipe key 'executor.stages.pretrain.nodes' must be at least 1"),
    ("executor.stages.pretrain=8", "recipe key 'executor.stages.pretrain' must be a mapping of slurm executor keys"),
])
def test_bad_stage_resources_name_the_key(override, message, data_root):
    with pytest.raises(UserError) as e:
        load_recipe("instructretro_8b", [*_cluster(data_root), override])
    assert message in str(e.value)


def test_docker_executor_builds_nemo_runs_docker_executor(tmp_path):
    """executor: docker maps onto NeMo-Run's DockerExecutor (no daemon needed to build it)."""
    from retro_toolkit.recipe import load_recipe
    from retro_toolkit import executors
    from retro_toolkit.executors import for_stage

    r = load_recipe("smoke", [f"workdir={tmp_path / 'w'}", "executor=docker", "executor.num_gpus=-1",
                              "executor.volumes=[/data:/data]", "executor.stages={build_db: {nproc_per_node: 2}}"])
    ex = executors.build(for_stage(r.executor, "build_db"), r)
    assert type(ex).__name__ == "DockerExecutor"
    assert ex.container_image == "retro-toolkit:latest" and ex.num_gpus == -1 and ex.ntasks_per_node == 2
    assert ex.volumes == [f"{tmp_path / 'w'}:{tmp_path / 'w'}", "/data:/data"] and ex.shm_size == "16g"
    assert ex.launcher == "torchrun" or type(ex.launcher).__name__ == "Torchrun"
    one = executors.build(for_stage(r.executor, "tokenizer"), r)
    assert one.ntasks_per_node == 1 and one.launcher is None
    assert executors.script(for_stage(r.executor, "build_db"), "build_db", tmp_path / "r.yaml").entrypoint == "python"


def test_the_dockerfile_builds_on_cuda_pytorch_with_faiss_gpu():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM \S*pytorch\S*cuda", text, flags=re.M | re.I), "a CUDA PyTorch base"
    assert "faiss-gpu" in text and "pip install" in text


def test_validate_estimates_disk_and_memory_of_instructretro_48b_at_its_corpus_size(data_root, tmp_path, run_cli):
    """A 1.2-trillion-token corpus (a Megatron dataset whose index megatron-core's own writer
    wrote; the .bin is sparse after its first real documents): the estimate names the stages'
    disk and the memory per rank from that size."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import _IndexWriter

    from retro_toolkit.collections.text.sentencepiece_tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(data_root / "tokenizer.model")
    real = [tok.encode(["a stand-in corpus for a tokenizer"])[0] + [tok.eod_id] for _ in range(8)]
    big = 2_000_000_000  # tokens per sequence (the .idx stores int32 lengths)
    lengths = [len(d) for d in real] + [big] * 600
    prefix = data_root / "pile_text_document"  # under the mounted data root, as on a cluster
    with open(f"{prefix}.bin", "wb") as f:
        f.write(np.concatenate([np.asarray(d, np.uint16) for d in real]).tobytes())
        f.truncate(sum(lengths) * 2)  # sparse: no disk is used
    with _IndexWriter(f"{prefix}.idx", np.uint16) as w:
        w.write(lengths, None, list(range(len(lengths) + 1)))
    tokens = sum(lengths)
    p = run_cli("validate", "instructretro_48b", *_cluster(data_root), *SSH, f"data.sources=[{{path: '{prefix}'}}]",
                "--estimate")
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert "corpus sized from Megatron datasets' token counts" in out
    assert f"{tokens:,} tokens x 4 bytes" in out  # a 256K vocabulary needs 4-byte tokens
    chunks = tokens * 0.98 / 64  # data.split's train share, in 64-token chunks
    assert f"{chunks:,.0f} chunks x 3 int64" in out
    assert "index OPQ64_128,IVF4194304_HNSW32,PQ64" in out
    assert re.search(r"build_db +[\d.,]+ TiB +index .* lists \(memory-mapped", out)
    assert re.search(r"build_db +3\.0 GiB +index coarse quantizer \(every rank\) \(4,194,304 centroids x 128 float32 "
                     r"\+ HNSW32 links\)", out)
    assert re.search(r"pretrain +[\d.,]+ GiB +weights, grads, optimizer \([\d,]+ parameters / TP 8", out)
    assert re.search(r"build_db +[\d.,]+ TiB +chunk embeddings \(float32, dim 1024", out)
    p = run_cli("validate", "instructretro_48b", *_cluster(data_root), *SSH, f"data.sources=[{{path: '{prefix}'}}]",
                "retrieval.keep_embeddings=false", "--estimate")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "chunk embeddings" not in p.stdout and "query embeddings" not in p.stdout
    assert re.search(r"build_db +244\.1 GiB +training sample embeddings \(float32, dim 1024", p.stdout)


def _shape(script: str, workdir: str, name: str) -> list[str]:
    """A job script without what a recipe sets for itself (work directory, name, account,
    partition, GPUs, memory, container, environment), NeMo-Run's experiment ids, and with
    every number (the sizes) as N."""
    text = script.replace(workdir, "WORKDIR").replace(f"retro-{name}-", "retro-NAME-")
    text = re.sub(r"/experiments/[^/\s]+/[^/\s]+/", "/experiments/EXP/", text)
    return [re.sub(r"\d+", "N", line) for line in text.splitlines()
            if line and not line.startswith(("#SBATCH --partition", "#SBATCH --account", "#SBATCH --gpus",
                                             "#SBATCH --mem", "#SBATCH --dependency", "#SBATCH --kill-on",
                                             "export ", "#SBATCH --container"))]


def test_the_two_node_test_job_is_rendered_as_the_48b_pretrain_job(data_root, run_cli, tmp_path):
    """The 2-node Slurm test (tests/test_slurm_two_nodes.py) runs the same script as the 48B
    recipe's 32-node pretrain job, sizes aside: one rendering function, one launch path."""
    from tests.conftest import SMALL, SMOKE
    from tests.test_pretrain import TRAIN

    big = run_cli("instructretro_48b", *_cluster(data_root), "executor.container_image=null", "--dry-run")
    assert big.returncode == 0, big.stderr
    w = tmp_path / "two"
    small = run_cli(SMOKE, *SMALL, *TRAIN, f"workdir={w}", "executor=slurm", "executor.partition=multi",
                    "executor.nodes=2", "executor.time=00:10:00", "--dry-run")
    assert small.returncode == 0, small.stderr
    a = _shape(_scripts(big.stdout)["pretrain"], f"{data_root}/runs/instructretro_48b", "instructretro_48b")
    b = _shape(_scripts(small.stdout)["pretrain"], str(w), "smoke")
    assert any("retro_toolkit.executors.node_launch" in line for line in a)
    assert a == b
