"""sft + eval_qa + generation through the real runner on the small database."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import SMALL, SMOKE, retro_run
from tests.test_pretrain import TRAIN, copy_db

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")]

STAGES = "stages=[tokenizer,prepare_corpus,build_db,pretrain,sft,eval_qa,export]"
SFT = [
    STAGES,
    "sft.train_iters=4",
    "sft.micro_batch_size=2",
    "sft.global_batch_size=4",
    "sft.lr=1e-3",
    "sft.min_lr=1e-3",
    "sft.log_interval=2",
    "eval_qa.tasks=[{name: smoke, path: 'builtin:smoke-qa', max_samples: 5}]",
    "eval_qa.max_new_tokens=8",
    "eval_qa.batch_size=4",
    "export.safetensors=true",
]


def test_sft_and_eval_qa_write_checkpoints_predictions_and_scores(tuned):
    assert (tuned / "checkpoints" / "sft" / "iter_0000004").is_dir()
    assert (tuned / "checkpoints" / "sft" / "latest").read_text().strip() == "iter_0000004"
    rows = [json.loads(x) for x in (tuned / "metrics" / "sft.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    preds = [json.loads(x) for x in (tuned / "eval" / "qa" / "smoke.jsonl").read_text().splitlines()]
    assert len(preds) == 5
    for p in preds:
        assert p["answers"] and isinstance(p["prediction"], str) and p["em"] in (0.0, 1.0) and 0 <= p["f1"] <= 1
        assert p["context"].startswith("source: ")  # eval_qa.contexts=retrieve (the smoke recipe's setting)
        assert p["finish_reason"] in ("eos", "stop", "length")
    scores = json.loads((tuned / "eval" / "qa" / "scores.json").read_text())
    assert scores["smoke"]["n"] == 5
    assert scores["smoke"]["f1"] == pytest.approx(100 * np.mean([p["f1"] for p in preds]), abs=0.01)
    assert scores["smoke"]["em"] == pytest.approx(100 * np.mean([p["em"] for p in preds]), abs=0.01)


def _state(checkpoint: Path) -> dict[str, torch.Tensor]:
    from retro_toolkit.collections.generate.session import load_session

    return {k: v.clone() for k, v in load_session(checkpoint).model.state_dict().items() if "_extra_state" not in k}


def test_sft_with_gate_0_leaves_cross_attention_and_encoder_untouched(tuned):
    from retro_toolkit.collections.retro.checkpointing import is_retrieval_param

    before, after = _state(tuned / "checkpoints" / "pretrain"), _state(tuned / "checkpoints" / "sft")
    retrieval = [k for k in before if is_retrieval_param(k)]
    decoder = [k for k in before if not is_retrieval_param(k)]
    assert retrieval and decoder
    assert all(torch.equal(before[k], after[k]) for k in retrieval)
    assert sum(not torch.equal(before[k], after[k]) for k in decoder) > len(decoder) // 2


def test_a_longer_sft_resumes_from_the_last_checkpoint(tuned, tmp_path):
    w = copy_db(tuned, tmp_path / "w")
    p = retro_run(SMOKE, f"workdir={w}", *SMALL, *TRAIN, *SFT, "sft.train_iters=6", "--stages", "sft")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "resuming from" in p.stdout and "iteration 4" in p.stdout
    rows = [json.loads(x) for x in (w / "metrics" / "sft.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5, 6]
    old = [json.loads(x) for x in (tuned / "metrics" / "sft.jsonl").read_text().splitlines()]
    assert rows[:4] == old


def test_live_retrieval_queries_every_completed_chunk_with_the_generated_text(tuned):
    from retro_toolkit.collections.generate import LiveRetrieval, SamplingParams, generate_ids
    from retro_toolkit.collections.generate.session import load_session

    s = load_session(workdir=tuned)
    m = s.model.config.chunk_length
    prompts = s.tokenizer.encode(["The with statement is used to", "A class definition"])
    source = LiveRetrieval(s.retriever(), s.model.config.num_neighbors)
    new = 3 * m
    outs = generate_ids(s.model, prompts, SamplingParams(max_new_tokens=new, temperature=1.0, seed=1), source)
    longest = max(len(p) for p in prompts) + new
    # Chunk i is looked up once its last position (i+1)m - 1 has been fed in, for the whole batch.
    fed = longest - 1
    chunks = [i for i, _ in source.log]
    assert chunks == list(range(fed // m))
    assert source.queries == len(prompts) * len(chunks)
    # The lookups used the generated text: redoing one from the final tokens gives the same hits.
    full = [p + o.tokens for p, o in zip(prompts, outs)]
    for i, ids in source.log:
        chunk_tokens = [f[i * m : (i + 1) * m] for f in full]
        if all(len(c) == m for c in chunk_tokens):
            assert np.array_equal(s.retriever().search(chunk_tokens, k=ids.shape[1]).ids, ids)
    assert len({tuple(ids[0]) for _, ids in source.log}) > 1  # the neighbours change with the text


def test_generate_cli_answers_from_a_work_directory(tuned):
    p = retro_run("generate", "--workdir", str(tuned), "--chat", "--prompt", "What does pass do?",
                  "--max-new-tokens", "8")
    assert p.returncode == 0, p.stderr
    p = retro_run("generate", "--checkpoint", str(tuned / "nope"), "--prompt", "x")
    assert p.returncode == 2 and "nope" in p.stderr


def test_export_packages_the_sft_model_and_a_fresh_process_restores_identical_logits(tuned, tmp_path):
    from omegaconf import OmegaConf

    from retro_toolkit.collections.generate.session import load_session

    package = tuned / "export" / "smoke.nemo"
    listing = subprocess.run(["tar", "-tf", str(package)], capture_output=True, text=True, check=True).stdout.split()
    assert sorted(listing) == ["./model_config.yaml", "./model_weights.ckpt", "./retrieval.yaml", "./tokenizer.model"]
    subprocess.run(["tar", "-xf", str(package), "-C", str(tmp_path)], check=True)
    cfg = OmegaConf.load(tmp_path / "model_config.yaml")
    assert cfg.arch == "retro" and cfg.seq_length == 128 and cfg.tokenizer.model == "nemo:tokenizer.model"
    retrieval = OmegaConf.load(tmp_path / "retrieval.yaml")
    assert retrieval.index == "Flat" and retrieval.chunk_length == 64 and retrieval.num_neighbors == 2
    assert retrieval.embedder == "builtin:all-minilm-l6-v2" and retrieval.db_chunks > 0

    s = load_session(tuned / "checkpoints" / "sft")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, s.tokenizer.vocab_size, (2, 128), generator=g)
    neighbors = torch.randint(0, s.tokenizer.vocab_size, (2, 2, 2, 128), generator=g)
    neighbors[1, 1, 0, 50:] = -1
    with torch.no_grad():
        want = s.model(tokens, neighbors)
    torch.save({"tokens": tokens, "neighbors": neighbors}, tmp_path / "inputs.pt")
    code = ("import torch, warnings; warnings.simplefilter('ignore');"
            "from retro_toolkit.checkpoint.nemo import restore;"
            f"x = torch.load({str(tmp_path / 'inputs.pt')!r}); m = restore({str(package)!r}).model;"
            f"torch.save(m(x['tokens'], x['neighbors']).detach(), {str(tmp_path / 'logits.pt')!r})")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), want)

    from retro_toolkit.checkpoint.safetensors_io import load_safetensors

    with torch.no_grad():
        assert torch.equal(load_safetensors(tuned / "export" / "smoke.safetensors").model(tokens, neighbors), want)


def test_generate_from_the_package_answers_like_the_checkpoint(tuned):
    ask = ["--prompt", "The with statement", "--max-new-tokens", "12", "--context", "with open(f) as g: pass"]
    from_nemo = retro_run("generate", "--nemo", str(tuned / "export" / "smoke.nemo"), *ask)
    from_ckpt = retro_run("generate", "--checkpoint", str(tuned / "checkpoints" / "sft"), *ask)
    assert from_nemo.returncode == 0 and from_ckpt.returncode == 0, from_nemo.stderr + from_ckpt.stderr
    assert from_nemo.stdout == from_ckpt.stdout
    live = retro_run("generate", "--nemo", str(tuned / "export" / "smoke.nemo"), "--workdir", str(tuned),
                     "--live-retrieval", "--prompt", "A class definition", "--max-new-tokens", "70")
    assert live.returncode == 0, live.stderr
    bad = retro_run("generate", "--nemo", str(tuned / "export" / "smoke.nemo"), "--live-retrieval", "--prompt", "x")
    assert bad.returncode == 2 and "live retrieval needs a work directory" in bad.stderr


def test_export_hf_of_the_tuned_package_computes_its_decoder_in_transformers(tuned, tmp_path):
    import transformers

    from retro_toolkit.checkpoint import nemo
    from retro_toolkit.checkpoint.hf_export import export_hf
    from retro_toolkit.collections.generate import SamplingParams, generate_ids

    package = tuned / "export" / "smoke.nemo"
    out = export_hf(package, tmp_path / "hf", log=lambda _: None)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "GPTNeoXForCausalLM"
    pkg = nemo.restore(package, device="cpu")
    assert pkg.section["arch"] == "retro"
    tokens = torch.randint(0, pkg.tokenizer.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    missing = torch.full((2, 2, pkg.section["num_neighbors"], 128), -1)  # no neighbours: the decoder alone
    with torch.no_grad():
        ours, theirs = pkg.model(tokens, missing), hf(tokens).logits
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-5

    question = "Question: What does the pass statement do?"
    prompt = pkg.tokenizer.encode([question])[0]
    eod = pkg.tokenizer.special_ids()["eod"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)  # the SentencePiece model's tokenizer.json
    assert hf_tok(question, add_special_tokens=False).input_ids == prompt and hf_tok.eos_token_id == eod
    ours = generate_ids(pkg.model, [prompt], SamplingParams(max_new_tokens=24), eos_id=eod)[0]
    with torch.no_grad():  # transformers stops at the config's eos_token_id, the end-of-document token
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
    assert ours.tokens and ours.tokens + ([eod] if ours.finish_reason == "eos" else []) == theirs
    assert hf_tok.decode(theirs, skip_special_tokens=True) == pkg.tokenizer.decode(theirs)


@pytest.mark.parametrize("override,match", [
    ("eval_qa.tasks=[{name: triviaqa, path: 'builtin:smoke-qa'}]", "eval_qa.tasks\\[0\\].name' = 'triviaqa' is not one"),
    ("eval_qa.tasks=[{name: nq, path: /no/such/nq.json}]", "/no/such/nq.json, which does not exist"),
    ("sft.datasets=[]", "'sft.datasets' is empty"),
    ("sft.datasets=[{name: a, path: 'builtin:smoke-instruct', weight: 0}]", "sum to 0"),
    ("sft.datasets=[{name: a, path: 'builtin:smoke-instruct', format: chat}]", "format' = 'chat' is not one of"),
    ("sft.seq_length=100", "multiple of model.chunk_length"),
    ("export.weights=zip", "export.weights' = 'zip' is not one of"),
    ("export.checkpoint=/no/such/ckpt", "'export.checkpoint' points to /no/such/ckpt"),
])
def test_bad_sft_and_qa_settings_exit_2_naming_the_key(override, match):
    p = retro_run("validate", SMOKE, override)
    assert p.returncode == 2
    assert re.search(match, p.stderr), p.stderr
