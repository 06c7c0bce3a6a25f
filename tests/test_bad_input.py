"""Bad input a new user can give: every case exits 2 with one paragraph naming the key or
file, no traceback, and nothing written (no work directory; an existing file untouched).

The checks of `runner.preflight.check_launch` (work directory, Slurm's tools, container
mounts) are tested in-process and through the command line (a run and `retro-run validate`
both call it before any work directory exists).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retro_toolkit.collections.text import source_probe
from retro_toolkit.errors import UserError
from retro_toolkit.recipe import load_recipe
from retro_toolkit.recipe.yaml_io import MAX_YAML_BYTES, read_yaml
from retro_toolkit.runner.preflight import check_inputs, check_launch
from tests.conftest import CORPUS_ONLY, REPO, SMOKE, retro_run

# A recipe of its own (not smoke's overrides), as a user writes one: the corpus stages only.
HEADER = """\
defaults:
  - model: retro_tiny
  - data: pydoc
  - tokenizer: sentencepiece_small
  - executor: local
  - _self_
name: mine
stages: [tokenizer, prepare_corpus]
"""


def _refused(p: subprocess.CompletedProcess, *needles: str, workdir: Path | None = None) -> None:
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr  # one paragraph
    for needle in needles:
        assert needle in p.stderr, (needle, p.stderr)
    if workdir is not None:
        assert not workdir.exists(), f"{workdir} was created"


def _recipe(tmp_path: Path, body: str, name: str = "r.yaml") -> Path:
    f = tmp_path / name
    f.write_text(body)
    return f


# ---- 1. duplicate keys -------------------------------------------------------------------

@pytest.mark.parametrize("command", ["run", "validate"])
def test_duplicate_key_in_a_recipe_names_file_lines_and_key(tmp_path, command):
    f = _recipe(tmp_path, HEADER + "tokenizer:\n  vocab_size: 1000\n  model_type: bpe\n  vocab_size: 2000\n")
    w = tmp_path / "w"
    _refused(retro_run(command, str(f), f"workdir={w}"), str(f), "'vocab_size'", "line 10 and line 12", workdir=w)


def test_duplicate_top_level_key_in_a_recipe(tmp_path):
    f = _recipe(tmp_path, HEADER + "seed: 1\nstages: [tokenizer]\n")
    w = tmp_path / "w"
    _refused(retro_run(str(f), f"workdir={w}"), str(f), "'stages'", "line 8 and line 10", workdir=w)


def test_duplicate_key_in_a_yaml_piece(tmp_path):
    piece = _recipe(tmp_path, "arch: retro\nnum_layers: 2\nhidden_size: 64\nnum_layers: 4\n", "model.yaml")
    w = tmp_path / "w"
    p = retro_run(SMOKE, CORPUS_ONLY, f"model={piece}", f"workdir={w}")
    _refused(p, f"model piece {piece}", "'num_layers'", "line 2 and line 4", workdir=w)


def test_duplicate_key_in_a_piece_of_the_recipes_own_tree(tmp_path):
    (tmp_path / "yaml" / "tokenizer").mkdir(parents=True)
    (tmp_path / "recipes").mkdir()
    piece = tmp_path / "yaml" / "tokenizer" / "twice.yaml"
    piece.write_text("vocab_size: 1000\nvocab_size: 1000\n")  # even with the same value
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.write_text(HEADER.replace("sentencepiece_small", "twice"))
    with pytest.raises(UserError, match=rf"tokenizer piece {piece}: key 'vocab_size' appears twice.*line 1 and line 2"):
        load_recipe(str(recipe))


def test_merge_keys_may_repeat_what_they_merge(tmp_path):
    """`<<: *anchor` then an own key of the same name is YAML's override, not a duplicate."""
    f = _recipe(tmp_path, HEADER.replace("name: mine\n", "name: mine\npaths: &p {data: /a, extra: /b}\n")
                + "model:\n  <<: {num_layers: 3, hidden_size: 64}\n  num_layers: 6\n  cca_layers: [6]\n")
    r = load_recipe(str(f))
    assert r.model.num_layers == 6 and r.paths.data == "/a"


def test_duplicate_key_inside_an_override_value(tmp_path):
    w = tmp_path / "w"
    p = retro_run(SMOKE, CORPUS_ONLY, "data.sources=[{path: builtin:pydoc, path: builtin:wiki-sample}]", f"workdir={w}")
    _refused(p, "data.sources", "'path' appears twice", workdir=w)


def test_bundled_recipes_and_pieces_have_no_duplicate_keys():
    files = sorted((REPO / "yaml").rglob("*.yaml")) + sorted((REPO / "recipes").glob("*.yaml"))
    assert len(files) > 20
    for f in files:
        read_yaml(f, "file")  # raises on a duplicate key


# ---- 2. integers out of range ------------------------------------------------------------

BIG = "1000000000000000000000000000000"


@pytest.mark.parametrize("override, key, bound", [
    (f"tokenizer.vocab_size={BIG}", "tokenizer.vocab_size", "at most 10,000,000"),
    ("model.vocab_size=4294967296", "model.vocab_size", "at most 10,000,000"),
    ("model.num_layers=100000000000", "model.num_layers", "at most 1,024"),
    ("pretrain.train_iters=10000000000000", "pretrain.train_iters", "at most 1,000,000,000"),
])
def test_huge_integers_exit_2_naming_key_value_and_bound(tmp_path, override, key, bound):
    w = tmp_path / "w"
    value = override.split("=", 1)[1]
    _refused(retro_run(SMOKE, CORPUS_ONLY, override, f"workdir={w}"), f"'{key}'", bound, f"got {value}", workdir=w)


@pytest.mark.parametrize("override, message", [
    ("model.hidden_size=1000000000", "'model.hidden_size' must be at most 131,072 (got 1000000000)"),
    ("model.num_attention_heads=99999999", "'model.num_attention_heads' must be at most"),
    ("model.ffn_hidden_size=10000000000", "'model.ffn_hidden_size' must be at most"),
    ("model.seq_length=68719476736", "'model.seq_length' must be at most 1,048,576"),
    ("model.chunk_length=0", "'model.chunk_length' must be at least 1 (got 0)"),
    ("model.num_neighbors=100000", "'model.num_neighbors' must be at most 1,024"),
    ("model.num_retrieved_chunks=0", "'model.num_retrieved_chunks' must be at least 1"),
    ("model.tensor_model_parallel_size=0", "'model.tensor_model_parallel_size' must be at least 1"),
    ("pretrain.global_batch_size=10000000000", "'pretrain.global_batch_size' must be at most"),
    ("pretrain.micro_batch_size=0", "'pretrain.micro_batch_size' must be at least 1 (got 0)"),
    ("pretrain.save_interval=-5", "'pretrain.save_interval' must be at least 0 (got -5)"),
    ("pretrain.log_interval=10000000000", "'pretrain.log_interval' must be at most"),
    ("retrieval.block_size=100000000000", "'retrieval.block_size' must be at most 10,000,000"),
    ("retrieval.k_query=5000", "'retrieval.k_query' must be at most 2,048"),
    ("retrieval.index.nprobe=0", "'retrieval.index.nprobe' must be at least 1"),
    ("seed=-1", "'seed' must be at least 0 (got -1)"),
    ("seed=4294967296", "'seed' must be at most 2,147,483,647"),
    ("data.sources=[{path: builtin:pydoc, max_docs: 0}]", "'data.sources[0].max_docs' must be at least 1 (got 0)"),
    ("eval_qa.max_new_tokens=0", "'eval_qa.max_new_tokens' must be at least 1"),
    ("tokenizer.vocab_size=3", "'tokenizer.vocab_size' must be at least 16 (got 3)"),
    ("pretrain.lr=.inf", "'pretrain.lr' must be a finite number"),
    (f"retrieval.seed={BIG}{BIG}", "(got 1000000000000000000000000000000100000... (62 digits))"),
])
def test_integer_bounds_in_process(override, message):
    with pytest.raises(UserError) as e:
        load_recipe(SMOKE, [override])
    assert message in str(e.value)


def test_per_stage_executor_keys_are_bounded_too():
    with pytest.raises(UserError, match=r"'executor.stages.pretrain.nodes' must be at most 100,000 \(got 1000000000\)"):
        load_recipe(SMOKE, ["executor=slurm", "executor.stages={pretrain: {nodes: 1000000000}}"])


def test_bounds_of_stages_not_run_are_not_checked():
    """sft and eval_qa keys are checked with their stage, as their other checks are."""
    r = load_recipe(SMOKE, [CORPUS_ONLY, "eval_qa.max_new_tokens=0", "sft.train_iters=0"])
    assert r.eval_qa.max_new_tokens == 0


# ---- 3. alias bomb, size and depth -------------------------------------------------------

def _bomb(levels: int = 9, width: int = 9) -> str:
    lines = [HEADER, f"x0: &x0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


_MEASURE = """
import resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t
rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(p.returncode, wall, rss_kb)
sys.stderr.write(p.stderr)
"""


def _measured(*args: str) -> tuple[subprocess.CompletedProcess, float, float]:
    """`retro-run ARGS` in a fresh parent whose only child it is: exit code, wall s, peak RSS MB."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    outer = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, "-m", "retro_toolkit", *args],
                           capture_output=True, text=True, cwd=REPO, env=env, timeout=120, check=False)
    code, wall, rss_kb = outer.stdout.split()
    inner = subprocess.CompletedProcess(args, int(code), "", outer.stderr)
    return inner, float(wall), int(rss_kb) / 1024


def test_alias_bomb_is_refused_fast_and_small(tmp_path):
    bomb = _recipe(tmp_path, _bomb())  # 9**9 = 387M strings once expanded
    plain = _recipe(tmp_path, HEADER + "seed: [unclosed\n", "plain.yaml")  # refused at the same step
    w = tmp_path / "w"
    base, _, base_mb = _measured("validate", str(plain), f"workdir={w}")
    assert base.returncode == 2, base.stderr
    p, wall, mb = _measured(str(bomb), f"workdir={w}")
    _refused(p, str(bomb), "once its aliases (*name) are expanded", "100,000", workdir=w)
    assert wall < 2.0, f"{wall:.2f} s"
    assert mb - base_mb < 200, f"{mb:.0f} MB against {base_mb:.0f} MB"


def test_a_bomb_in_a_yaml_piece_and_in_an_override(tmp_path):
    piece = _recipe(tmp_path, _bomb().replace(HEADER, ""), "model.yaml")
    with pytest.raises(UserError, match=rf"model piece {piece}: it holds more than 100,000 values"):
        load_recipe(SMOKE, [f"model={piece}"])
    value = "{a: &a [1,1,1,1,1,1,1,1,1,1], b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], " \
            "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], " \
            "e: [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]}"
    with pytest.raises(UserError, match=r"override 'paths=...': it holds more than 100,000 values"):
        load_recipe(SMOKE, [f"paths={value}"])


def test_recursive_alias_and_deep_nesting_are_refused(tmp_path):
    f = _recipe(tmp_path, HEADER + "paths: &p {a: *p}\n")
    with pytest.raises(UserError, match=rf"recipe {f}: the alias on line 9 refers to a list or mapping that contains"):
        load_recipe(str(f))
    f = _recipe(tmp_path, HEADER + "x: " + "[" * 5000 + "]" * 5000 + "\n")
    t = time.perf_counter()
    with pytest.raises(UserError, match=rf"recipe {f}: it is nested too deeply"):
        load_recipe(str(f))
    assert time.perf_counter() - t < 2


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path):
    f = _recipe(tmp_path, HEADER + "# " + "x" * MAX_YAML_BYTES + "\n")
    w = tmp_path / "w"
    _refused(retro_run(str(f), f"workdir={w}"), str(f), f"larger than {MAX_YAML_BYTES:,} bytes", workdir=w)


# ---- 4. the work directory ---------------------------------------------------------------

def test_workdir_that_is_a_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep me\n")
    with pytest.raises(UserError, match=rf"workdir {f} exists and is a file, not a folder.*Set workdir="):
        check_launch(load_recipe(SMOKE, [CORPUS_ONLY, f"workdir={f}"]))
    with pytest.raises(UserError, match=rf"workdir {f}/w cannot be created: {f} is a file"):
        check_launch(load_recipe(SMOKE, [CORPUS_ONLY, f"workdir={f}/w"]))
    assert f.read_text() == "keep me\n"


@pytest.mark.skipif(os.access("/proc/1", os.W_OK) or not os.path.isdir("/proc/1"),
                    reason="needs a folder this user cannot write: /proc/1 (Linux)")
def test_workdir_in_a_folder_nobody_can_write(tmp_path):
    with pytest.raises(UserError, match=r"workdir /proc/1/run/w cannot be created: its nearest existing parent "
                                        r"/proc/1 is not writable"):
        check_launch(load_recipe(SMOKE, [CORPUS_ONLY, "workdir=/proc/1/run/w"]))
    with pytest.raises(UserError, match=r"workdir /proc/1 is a folder this user cannot write"):
        check_launch(load_recipe(SMOKE, [CORPUS_ONLY, "workdir=/proc/1"]))


def test_usable_workdirs_pass(tmp_path):
    check_launch(load_recipe(SMOKE, [CORPUS_ONLY, f"workdir={tmp_path}"]))  # exists, writable
    check_launch(load_recipe(SMOKE, [CORPUS_ONLY, f"workdir={tmp_path}/a/b/c"]))  # created under tmp_path
    assert not (tmp_path / "a").exists()


def test_cli_workdir_that_is_a_file_is_left_alone(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep me\n")
    _refused(retro_run(SMOKE, CORPUS_ONLY, f"workdir={f}"), "workdir", str(f))
    assert f.read_text() == "keep me\n"


def test_cli_workdir_under_a_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep me\n")
    _refused(retro_run(SMOKE, CORPUS_ONLY, f"workdir={f}/w"), "workdir", str(f))
    assert f.read_text() == "keep me\n"


@pytest.mark.skipif(os.access("/proc/1", os.W_OK) or not os.path.isdir("/proc/1"), reason="needs /proc/1")
def test_cli_workdir_not_writable():
    _refused(retro_run(SMOKE, CORPUS_ONLY, "workdir=/proc/1/run/w"), "workdir", "/proc/1")


# ---- 5. corpus files, before any work directory exists -----------------------------------

def _source(path: Path, *extra: str) -> list[str]:
    return [CORPUS_ONLY, f"data.sources=[{{path: {path}}}]", *extra]


CORPORA = [
    ("empty.txt", b"", "is empty"),
    ("blank.txt", b"\n  \n\t\n", "is empty"),
    ("empty.jsonl", b"", "has no records"),
    ("blank.jsonl", b'{"text": ""}\n\n{"text": "   "}\n', "has no non-empty 'text' in any of its 2 records"),
    ("latin1.txt", "line one\ncaf\xe9\n".encode("latin-1"), ":2: invalid UTF-8 at byte 12"),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ":2: invalid UTF-8"),
    ("nokey.jsonl", b'{"text": "ok"}\n\n{"body": "x"}\n', ":3: no field 'text' in this record (its fields: 'body')"),
    ("notobject.jsonl", b'{"text": "ok"}\n["text"]\n', ":2: a JSON list, not an object"),
    ("notjson.jsonl", b'{"text": "ok"}\n{"text": \n', ":2: not valid JSON"),
    ("number.jsonl", b'{"text": 5}\n', ":1: field 'text' is a int, not a string"),
]


@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize("name, content, message", CORPORA, ids=[c[0] for c in CORPORA])
def test_bad_corpus_is_refused_before_the_work_directory(tmp_path, command, name, content, message):
    f = tmp_path / name
    f.write_bytes(content)
    w = tmp_path / "w"
    _refused(retro_run(command, SMOKE, *_source(f, f"workdir={w}")), str(f), message, workdir=w)


def test_bad_corpus_messages_name_the_key_and_the_fix(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match=r"Set data.sources\[0\].text_key to the field"):
        check_inputs(load_recipe(SMOKE, _source(f)))
    f.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"data.on_invalid_utf8=replace"):
        check_inputs(load_recipe(SMOKE, _source(f)))
    check_inputs(load_recipe(SMOKE, _source(f, "data.on_invalid_utf8=replace")))  # replaced, as the reader does
    extra = tmp_path / "extra.txt"
    extra.write_text("")
    with pytest.raises(UserError, match=rf"retrieval.extra_sources\[0\].path: {extra} is empty"):
        check_inputs(load_recipe(SMOKE, ["stages=[tokenizer,prepare_corpus,build_db]",
                                         f"retrieval.extra_sources=[{{path: {extra}}}]"]))


def test_folder_of_empty_txt_files(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text("")
    (tmp_path / "docs" / "sub" / "b.txt").write_text("\n\n")
    with pytest.raises(UserError, match=rf"every .txt file in folder {tmp_path / 'docs'} is empty"):
        check_inputs(load_recipe(SMOKE, _source(tmp_path / "docs")))
    (tmp_path / "docs" / "sub" / "c.txt").write_bytes(b"ok\n\xff\n")
    with pytest.raises(UserError, match=rf"{tmp_path / 'docs' / 'sub' / 'c.txt'}:2: invalid UTF-8"):
        check_inputs(load_recipe(SMOKE, _source(tmp_path / "docs")))
    (tmp_path / "docs" / "sub" / "c.txt").write_text("text\n")
    check_inputs(load_recipe(SMOKE, _source(tmp_path / "docs")))


def test_good_corpora_pass_and_a_cut_character_at_the_probe_end_is_fine(tmp_path, monkeypatch):
    f = tmp_path / "c.jsonl"
    f.write_text('\n{"text": ""}\n{"text": "one", "id": 1}\n')
    check_inputs(load_recipe(SMOKE, _source(f)))
    t = tmp_path / "c.txt"
    t.write_text("é" * 100)  # 200 bytes of two-byte characters
    monkeypatch.setattr(source_probe, "PROBE_BYTES", 51)  # cuts one in half
    check_inputs(load_recipe(SMOKE, _source(t)))


def test_the_probe_reads_a_bounded_prefix(tmp_path, monkeypatch):
    """A huge corpus is checked by its start: problems beyond it are the reader's to report."""
    monkeypatch.setattr(source_probe, "PROBE_BYTES", 4096)
    good = "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(1000))  # ~26 KB
    f = tmp_path / "big.jsonl"
    f.write_bytes(good.encode() + b'{"text": "caf\xe9"}\n{"body": 1}\n')
    check_inputs(load_recipe(SMOKE, _source(f)))
    monkeypatch.setattr(source_probe, "PROBE_BYTES", 1 << 20)
    f.write_bytes(good.encode() * 20 + b"\xff\n")  # past PROBE_RECORDS: not read
    t = time.perf_counter()
    check_inputs(load_recipe(SMOKE, _source(f)))
    assert time.perf_counter() - t < 1
    f.write_bytes(b'{"text": "x"}\n' * (source_probe.PROBE_RECORDS - 1) + b'{"body": 1}\n')  # the 100th record is read
    with pytest.raises(UserError, match=rf":{source_probe.PROBE_RECORDS}: no field 'text'"):
        check_inputs(load_recipe(SMOKE, _source(f)))


# ---- 6. Slurm without sbatch -------------------------------------------------------------

def test_slurm_without_sbatch_says_what_is_missing(tmp_path, monkeypatch):
    recipe = load_recipe(SMOKE, [CORPUS_ONLY, "executor=slurm", f"workdir={tmp_path}/w"])
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(UserError) as e:
        check_launch(recipe)
    msg = str(e.value)
    assert "executor.type is slurm" in msg and "sbatch and sacct are not on PATH" in msg and "--dry-run" in msg
    assert "\n" not in msg
    check_launch(recipe, need_scheduler=False)  # e.g. for `retro-run validate` on a laptop
    ssh = load_recipe(SMOKE, [CORPUS_ONLY, "executor=slurm", "executor.tunnel.type=ssh",
                              "executor.tunnel.host=login.example.com", f"workdir={tmp_path}/w"])
    check_launch(ssh)  # sbatch runs on the login node
    no_host = load_recipe(SMOKE, [CORPUS_ONLY, "executor=slurm", "executor.tunnel.type=ssh", f"workdir={tmp_path}/w"])
    with pytest.raises(UserError, match="executor.tunnel.host is not set"):
        check_launch(no_host)


def test_cli_slurm_without_sbatch(tmp_path):
    env = dict(os.environ, PATH=str(Path(sys.executable).parent))  # python, no Slurm
    w = tmp_path / "w"
    p = subprocess.run([sys.executable, "-m", "retro_toolkit", SMOKE, "executor=slurm", "stages=[tokenizer]",
                        f"workdir={w}"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120, check=False)
    _refused(p, "sbatch", "--dry-run", workdir=w)


# ---- 7. container mounts -----------------------------------------------------------------

def _container(mounts: str, *extra: str) -> list[str]:
    return ["executor=slurm", "executor.container_image=registry.example.com/retro:1",
            f"executor.container_mounts={mounts}", *extra]


@pytest.fixture
def cluster(tmp_path) -> Path:
    """A shared file system (a folder of tmp_path) with an input of each kind."""
    root = tmp_path / "lustre"
    for rel in ("corpus.jsonl", "sft.jsonl", "qa.jsonl"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text('{"text": "x"}\n')
    for rel in ("gpt/latest", "bert/config.json", "tokenizer.model"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x\n")
    return root


def _everything(root: Path, workdir: Path) -> list[str]:
    return [f"workdir={workdir}", f"paths.data={root}",
            "stages=[tokenizer,prepare_corpus,build_db,pretrain,sft,eval_qa]",
            f"data.sources=[{{path: {root}/corpus.jsonl}}]", f"pretrain.init_from={root}/gpt",
            f"sft.init_from={root}/gpt", f"retrieval.embedder.path={root}/bert",
            f"sft.datasets=[{{name: s, path: {root}/sft.jsonl}}]",
            f"eval_qa.tasks=[{{name: nq, path: {root}/qa.jsonl}}]"]


def test_container_paths_inside_the_mounts_pass(cluster):
    check_launch(load_recipe(SMOKE, _container(f"[{cluster}:{cluster}:ro]", *_everything(cluster, cluster / "runs"))))
    # builtin: inputs live in the package the image holds
    check_launch(load_recipe(SMOKE, _container(f"[{cluster}:{cluster}]", CORPUS_ONLY, f"workdir={cluster}/w")))


@pytest.mark.parametrize("key, outside", [
    ("workdir", "workdir={elsewhere}/w"),
    ("paths.data", "paths.data={elsewhere}"),
    ("data.sources[0].path", "data.sources=[{{path: {elsewhere}/corpus.jsonl}}]"),
    ("tokenizer.model", "tokenizer.model={elsewhere}/tokenizer.model"),
    ("pretrain.init_from", "pretrain.init_from={elsewhere}/gpt"),
    ("sft.init_from", "sft.init_from={elsewhere}/gpt"),
    ("retrieval.embedder.path", "retrieval.embedder.path={elsewhere}/bert"),
    ("sft.datasets[0].path", "sft.datasets=[{{name: s, path: {elsewhere}/sft.jsonl}}]"),
    ("eval_qa.tasks[0].path", "eval_qa.tasks=[{{name: nq, path: {elsewhere}/qa.jsonl}}]"),
])
def test_a_path_outside_every_mount_names_key_path_and_mounts(cluster, tmp_path, key, outside):
    elsewhere = tmp_path / "home"
    elsewhere.mkdir()
    for rel in ("corpus.jsonl", "sft.jsonl", "qa.jsonl", "tokenizer.model", "gpt/latest", "bert/config.json"):
        (elsewhere / rel).parent.mkdir(parents=True, exist_ok=True)
        (elsewhere / rel).write_bytes((cluster / rel).read_bytes())
    mounts = f"[{cluster}:{cluster}]"
    overrides = _everything(cluster, cluster / "runs") + [outside.format(elsewhere=elsewhere)]
    if key == "tokenizer.model":
        overrides.append("stages=[tokenizer,prepare_corpus]")
    r = load_recipe(SMOKE, _container(mounts, *overrides))
    with pytest.raises(UserError) as e:
        check_launch(r)
    msg = str(e.value)
    assert f"recipe key '{key}' = {elsewhere}" in msg and f"mounts: {cluster}:{cluster}" in msg, msg
    assert "executor.container_mounts" in msg and "\n" not in msg


def test_a_mount_at_another_path_inside_does_not_count(cluster):
    r = load_recipe(SMOKE, _container(f"[{cluster}:/data]", CORPUS_ONLY, f"workdir={cluster}/w"))
    with pytest.raises(UserError, match=rf"'workdir' = {cluster}/w: .*puts it at /data/w inside, but the job opens "
                                        rf"{cluster}/w. Mount it at the same path"):
        check_launch(r)


def test_a_stage_with_its_own_container(cluster, tmp_path):
    """executor.stages.<stage> may run one stage in a container: only its paths must be mounted."""
    outside = tmp_path / "corpus.jsonl"
    outside.write_text('{"text": "x"}\n')
    own = f"{{container_image: img, container_mounts: [{cluster}:{cluster}]}}"
    overrides = ["executor=slurm", f"workdir={cluster}/w", CORPUS_ONLY, f"data.sources=[{{path: {outside}}}]",
                 f"executor.stages={{prepare_corpus: {own}}}"]
    with pytest.raises(UserError, match=r"'data.sources\[0\].path' .* \(stage prepare_corpus runs in container img"):
        check_launch(load_recipe(SMOKE, overrides))


def test_docker_mounts_the_workdir_and_its_volumes(cluster, tmp_path):
    check_launch(load_recipe(SMOKE, ["executor=docker", CORPUS_ONLY, f"workdir={tmp_path}/w"]))
    outside = load_recipe(SMOKE, ["executor=docker", "stages=[tokenizer]", f"workdir={tmp_path}/w",
                                  f"tokenizer.model={cluster}/tokenizer.model"])
    with pytest.raises(UserError, match=r"'tokenizer.model' .* lies outside every container mount"):
        check_launch(outside)
    check_launch(load_recipe(SMOKE, ["executor=docker", "stages=[tokenizer]", f"workdir={tmp_path}/w",
                                     f"tokenizer.model={cluster}/tokenizer.model",
                                     f"executor.volumes=[{cluster}:{cluster}]"]))


def test_cli_container_path_outside_the_mounts(cluster, tmp_path):
    p = retro_run("validate", SMOKE, *_container(f"[{cluster}:{cluster}]", CORPUS_ONLY, f"workdir={tmp_path}/w"))
    _refused(p, "'workdir'", f"{tmp_path}/w", f"{cluster}:{cluster}", workdir=tmp_path / "w")
