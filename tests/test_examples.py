"""Every script in examples/ runs as a user runs it (a subprocess, on tiny data) and does what
its docstring says. python_api.py's work directory is built once and reused by the
generation example."""

from __future__ import annotations

import ast
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")

EXAMPLES = REPO / "examples"
FIDELITY = REPO / "tests" / "fidelity" / "data"
# Every script in examples/ and the test that runs it; test_every_example_has_a_test keeps this honest.
TESTED = {
    "python_api.py": "test_python_api_runs_every_stage_and_restores_the_package",
    "generate_live_retrieval.py": "test_generate_live_retrieval_queries_the_index_per_chunk",
    "own_corpus.py": "test_own_corpus_builds_a_database_and_finds_the_nearest_chunks",
    "retrofit_gpt.py": "test_retrofit_gpt_keeps_the_decoder_and_trains_the_new_parts",
    "import_megatron.py": "test_import_megatron_writes_a_package_with_upstreams_logits",
}
FLOAT = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"


def run_example(name: str, *args: str, cwd: Path, timeout: float = 300) -> str:
    """`python examples/NAME ARGS` from `cwd`, offline; asserts exit 0 and returns stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    p = subprocess.run([sys.executable, str(EXAMPLES / name), *args], check=False, capture_output=True, text=True,
                       cwd=cwd, env=env, timeout=timeout)
    assert p.returncode == 0, f"{name} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p.stdout


def number(pattern: str, text: str) -> float:
    """The number `pattern` captures (as {n}) in text; asserts it is there and finite."""
    m = re.search(pattern.format(n=f"({FLOAT})"), text)
    assert m, f"no match for {pattern!r} in:\n{text[-3000:]}"
    x = float(m.group(1))
    assert math.isfinite(x), m.group(0)
    return x


def test_every_example_has_a_test():
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    assert scripts == set(TESTED), f"untested: {sorted(scripts - set(TESTED))}; gone: {sorted(set(TESTED) - scripts)}"
    defined = {n.name for n in ast.parse(Path(__file__).read_text()).body if isinstance(n, ast.FunctionDef)}
    assert set(TESTED.values()) <= defined


@pytest.mark.parametrize("name", sorted(TESTED))
def test_every_example_says_what_it_shows_and_how_to_run_it(name):
    tree = ast.parse((EXAMPLES / name).read_text())
    doc = ast.get_docstring(tree)
    assert doc and f"python examples/{name}" in doc, "the docstring must show how to run it"
    source = (EXAMPLES / name).read_text()
    assert '"--workdir"' in source and "argparse.ArgumentParser(description=__doc__" in source
    assert 'if __name__ == "__main__":' in source
    for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        assert fn.returns is not None, f"{name}: {fn.name} has no return type hint"


@pytest.fixture(scope="module")
def api_run(tmp_path_factory) -> tuple[Path, str]:
    """python_api.py on 20 pydoc topics with 4 training steps: (its work directory, its stdout)."""
    tmp = tmp_path_factory.mktemp("examples_api")
    out = run_example("python_api.py", "--workdir", str(tmp / "w"), "--docs", "20", "--iters", "4", cwd=tmp)
    return tmp / "w", out


@pytest.mark.slow
def test_python_api_runs_every_stage_and_restores_the_package(api_run):
    w, out = api_run
    ppl = json.loads((w / "eval" / "ppl.json").read_text())
    for split in ("valid", "test"):
        assert number(rf"eval_ppl {split}: ppl {{n}},", out) == pytest.approx(ppl[split]["ppl"], abs=0.01)
        assert number(rf"eval_ppl {split}: .* without retrieval {{n}}", out) > 1
    assert (w / "export" / "smoke.nemo").is_file() and (w / "eval" / "qa" / "scores.json").is_file()
    assert number(r"text ppl: {n}", out) > 1
    assert number(r"generated \(\w+, {n} tokens\)", out) <= 8


@pytest.mark.slow
def test_generate_live_retrieval_queries_the_index_per_chunk(api_run):
    w, _ = api_run
    # 70 new tokens complete the first 64-token chunk, which then queries the index.
    out = run_example("generate_live_retrieval.py", "--workdir", str(w), "--nemo", str(w / "export" / "smoke.nemo"),
                      "--max-new-tokens", "70", cwd=w.parent)
    assert "== retro-run generate --live-retrieval" in out and "== Session API" in out
    assert number(r"{n} chunk\(s\) looked up\)", out) >= 1
    db_chunks = json.loads((w / "stages" / "build_db.json").read_text())["summary"]["db_chunks"]
    ids = [int(i) for i in re.findall(r"chunk 0 neighbour \d: db chunk (-?\d+):", out)]
    assert len(ids) == 2 and all(0 <= i < db_chunks for i in ids), out


@pytest.mark.slow
def test_own_corpus_builds_a_database_and_finds_the_nearest_chunks(tmp_path):
    out = run_example("own_corpus.py", "--workdir", str(tmp_path / "w"), "--max-chars", "1500",
                      "--query", "Encode an object as a JSON string.", "-k", "2", cwd=tmp_path)
    corpus = (tmp_path / "w" / "corpus.jsonl").read_text().splitlines()
    assert len(corpus) == 30 and all(len(json.loads(line)["text"]) <= 1500 for line in corpus)
    assert number(r"database: {n} chunks of 64 tokens", out) > 50
    hits = re.findall(r"chunk \d+ \(distance (\S+)\): (.*)", out)
    assert len(hits) == 2 and all(math.isfinite(float(d)) for d, _ in hits)
    assert "json" in hits[0][1].lower(), out  # the json module's docs are the nearest


@pytest.mark.slow
def test_retrofit_gpt_keeps_the_decoder_and_trains_the_new_parts(tmp_path):
    out = run_example("retrofit_gpt.py", "--workdir", str(tmp_path), "--gpt-iters", "4", "--retro-iters", "2",
                      cwd=tmp_path)
    assert not (tmp_path / "gpt" / "db").exists() and (tmp_path / "retro" / "db").is_dir()
    number(r"GPT loss {n} ->", out)
    number(r"Retro, from it: {n} ->", out)
    m = re.search(r"decoder: (\d+)/(\d+) GPT tensors unchanged in Retro; (\d+) new tensors", out)
    assert m and m[1] == m[2] and int(m[2]) > 0 and int(m[3]) > 0, out
    assert number(r"output projection, \|w\| summed: {n}", out) > 0


@pytest.fixture(scope="module")
def tokenizer_96(tmp_path_factory) -> Path:
    """A 96-piece SentencePiece model: the vocabulary of the upstream-written test checkpoints."""
    from retro_toolkit.collections.text.sentencepiece_tokenizer import train_sentencepiece

    out = tmp_path_factory.mktemp("tok96") / "tokenizer.model"
    texts = ["the quick brown fox jumps over the lazy dog", "def main(): return 0 if x else 1",
             "import os, sys; print(sys.argv)"] * 20
    train_sentencepiece(texts, out, 96, "bpe", 1.0, 10000, False, 1)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint,reference,flavor", [
    ("legacy_nine_layers_checkpoint", "legacy_nine_layers.pt", "megatron_legacy"),
    ("nine_layers_torch_dist", "nine_layers.pt", "megatron_core"),
])
def test_import_megatron_writes_a_package_with_upstreams_logits(tmp_path, tokenizer_96, checkpoint, reference,
                                                                  flavor):
    import torch

    from retro_toolkit.checkpoint.nemo import restore

    ref = torch.load(FIDELITY / reference, weights_only=True)
    args = []
    if "retro_args" in ref:  # legacy args lack the chunk length; Megatron-LM read it from args.json
        (tmp_path / "args.json").write_text(json.dumps(ref["retro_args"]))
        args = ["--retro-args", str(tmp_path / "args.json")]
    out = run_example("import_megatron.py", str(FIDELITY / checkpoint), "--tokenizer", str(tokenizer_96),
                      "--workdir", str(tmp_path / "w"), *args, cwd=tmp_path)
    assert f"retro ({flavor}): 9 layers, hidden 32, chunk 4, 3 neighbours, vocab 96" in out
    number(r"next-token logits: 96 values, max {n}", out)
    assert number(r"generated \(\w+, {n} tokens\)", out) <= 8

    pkg = restore(tmp_path / "w" / "model.nemo", device="cpu")
    pkg.model.config.neighbor_pad_id = None  # upstream attends to pad tokens; the reference neighbours hold some
    with torch.no_grad():
        logits = pkg.model(ref["tokens"], ref["neighbor_tokens"])
    assert (logits - ref["logits"]).abs().max() <= 1e-5 * ref["logits"].abs().max()
