"""The decoder tokenizer as a Hugging Face tokenizer (tokenizer.json), and SentencePiece models
written as tokenizer.json for transformers: both compared with what transformers computes."""

from __future__ import annotations

import json
import shutil

import pytest

from retro_toolkit.collections.text.tokenizer import open_tokenizer, workdir_tokenizer
from retro_toolkit.errors import UserError
from tests.conftest import CORPUS_ONLY, SMOKE, retro_run
from tests.hf_tokenizers import EOS, make_hf_tokenizer

TEXTS = ["The with statement is used to wrap the execution of a block.", "  two  spaces\tand a tab\n\nnew line",
         "héllo wörld 日本語 ✓", "x = [i ** 2 for i in range(10)]  # squares", ""]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return make_hf_tokenizer(tmp_path_factory.mktemp("hf_tok") / "tok")


def test_a_hugging_face_folder_encodes_and_decodes_as_transformers(hf_folder, tmp_path):
    import transformers

    theirs = transformers.AutoTokenizer.from_pretrained(hf_folder)
    tok = open_tokenizer(hf_folder)
    assert tok.kind == "huggingface" and tok.vocab_size == len(theirs) == 1000
    eos = theirs.convert_tokens_to_ids(EOS)
    assert tok.special_ids() == {"pad": eos, "eod": eos, "bos": -1, "unk": -1}  # no pad token: the EOS pads
    ids = tok.encode(TEXTS)
    assert ids == [theirs(t, add_special_tokens=False).input_ids for t in TEXTS]
    assert tok.encode(TEXTS * 8) == ids * 8  # a batch cut into slices over threads comes back in order
    assert [tok.decode(i) for i in ids] == TEXTS  # byte-level BPE round-trips any text
    assert tok.decode(ids[0] + [eos]) == TEXTS[0]  # special tokens do not decode, as SentencePiece's control ids

    # The tokenizer.json file alone reads its special tokens from the files beside it.
    assert open_tokenizer(hf_folder / "tokenizer.json").sha256 == tok.sha256
    # Identity covers the special tokens: the same vocabulary with another EOS is another tokenizer.
    other = make_hf_tokenizer(tmp_path / "other", eos_token="<|pad|>")
    assert open_tokenizer(other).eod_id != tok.eod_id and open_tokenizer(other).sha256 != tok.sha256


def _config(folder, **changes):
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.update(changes)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("damage,match", [
    (lambda f: _config(f, eos_token=None), r"names no eos_token .* Add \"eos_token\" to .*tokenizer_config.json"),
    (lambda f: _config(f, eos_token="</s>"), r"eos_token '</s>' is not in tokenizer.json's vocabulary"),
    (lambda f: (f / "tokenizer_config.json").write_text("{not json"), r"tokenizer_config.json is not valid JSON"),
    (lambda f: (f / "tokenizer.json").write_text('{"model": 3}'), r"cannot load Hugging Face tokenizer .*tokenizer.json"),
    (lambda f: (f / "tokenizer.json").unlink(), r"holds neither tokenizer.json .* nor tokenizer.model"),
])
def test_bad_hugging_face_tokenizers_exit_2_before_a_work_directory_exists(hf_folder, tmp_path, damage, match):
    folder = tmp_path / "tok"
    shutil.copytree(hf_folder, folder)
    damage(folder)
    with pytest.raises(UserError, match=match):
        open_tokenizer(folder)
    w = tmp_path / "w"
    p = retro_run(SMOKE, CORPUS_ONLY, f"workdir={w}", f"tokenizer.model={folder}")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert not w.exists()


@pytest.mark.slow
def test_sentencepiece_models_become_tokenizer_json_that_segments_alike(smoke_local, tmp_path):
    """Unigram: equal ids, or (where SentencePiece and tokenizers break a tie differently) a
    segmentation of exactly the same score and text. BPE: equal ids."""
    import pydoc_data.topics
    from tokenizers import Tokenizer as RustTokenizer

    from retro_toolkit.collections.text.sentencepiece_convert import tokenizer_json
    from retro_toolkit.collections.text.sentencepiece_tokenizer import SentencePieceTokenizer, train_sentencepiece

    texts = [t[:2000] for t in pydoc_data.topics.topics.values()][:60] + TEXTS
    train_sentencepiece(iter(texts), tmp_path / "bpe.model", 600, "bpe", 1.0, 10000, True, 1)
    for sp in (workdir_tokenizer(smoke_local), SentencePieceTokenizer(tmp_path / "bpe.model")):
        data, special = tokenizer_json(sp.proto, sp.name)
        assert special == {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
        hf = RustTokenizer.from_str(data.decode())
        ours = sp.encode(texts)
        theirs = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
        for text, a, b in zip(texts, ours, theirs):
            assert hf.decode(a) == sp.decode(a) and hf.decode(b) == sp.decode(a), text[:40]
            score = [sum(sp.sp.get_score(i) for i in ids) for ids in (a, b)]
            assert a == b or score[0] == pytest.approx(score[1], abs=1e-4), text[:40]
        same = sum(a == b for a, b in zip(ours, theirs))
        assert same == len(texts) if "bpe" in sp.name else same >= 0.6 * len(texts)


@pytest.mark.slow
def test_a_llama_with_its_tokenizer_json_goes_through_retro_and_back_to_transformers(hf_folder, tmp_path):
    """A Hugging Face Llama folder holding only tokenizer.json + tokenizer_config.json: the work
    directory tokenizes with it, Retro starts from the Llama, the package carries the tokenizer,
    and export-hf gives it back to transformers unchanged."""
    import torch
    import transformers

    from retro_toolkit.checkpoint import nemo
    from retro_toolkit.checkpoint.gpt_sources import import_gpt
    from retro_toolkit.checkpoint.hf_export import export_hf
    from retro_toolkit.collections.text import token_stream as ts
    from tests.conftest import SMALL
    from tests.test_pretrain import TRAIN, losses

    llama = tmp_path / "llama"
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=0)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(llama)
    for f in hf_folder.iterdir():
        shutil.copyfile(f, llama / f.name)
    overrides = ["model.normalization=RMSNorm", "model.swiglu=true", "model.add_bias_linear=false",
                 "model.num_query_groups=2", "model.untie_embeddings_and_output_weights=true"]
    w = tmp_path / "w"
    p = retro_run(SMOKE, f"workdir={w}", *SMALL, *TRAIN, "pretrain.train_iters=2", "pretrain.freeze_decoder=true",
                  "stages=[tokenizer,prepare_corpus,build_db,pretrain,export]", f"tokenizer.model={llama}",
                  f"pretrain.init_from={llama}", *overrides)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "using the given Hugging Face tokenizer" in p.stdout + p.stderr
    assert sorted(f.name for f in (w / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    tok = open_tokenizer(llama)
    corpus = ts.TokenStream(w / ts.CORPUS_DIR, "train")
    assert corpus.meta["special_ids"]["eod"] == tok.eod_id == 0 and corpus.meta["tokenizer_sha256"] == tok.sha256
    first = corpus.document(0)
    assert first[-1] == tok.eod_id and tok.decode(first[:-1]).strip()  # documents end in the tokenizer's EOS
    assert len(losses(w)) == 2

    package = w / "export" / "smoke.nemo"
    cfg = nemo.read_config(package)
    assert cfg["tokenizer"] == {"library": "huggingface", "model": "nemo:tokenizer.json",
                                "config": "nemo:tokenizer_config.json", "sha256": tok.sha256}
    pkg = nemo.restore(package, device="cpu")
    assert pkg.tokenizer.kind == "huggingface" and pkg.tokenizer.encode(TEXTS) == tok.encode(TEXTS)

    out = export_hf(package, tmp_path / "hf", log=lambda _: None)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (llama / name).read_bytes()
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert [theirs(t, add_special_tokens=False).input_ids for t in TEXTS] == tok.encode(TEXTS)
    assert type(transformers.AutoModelForCausalLM.from_pretrained(out)).__name__ == "LlamaForCausalLM"

    # import-gpt carries the folder's tokenizer.json into its package.
    imported = import_gpt(llama, tmp_path / "llama.nemo", log=lambda _: None)
    assert nemo.read_config(imported)["tokenizer"]["sha256"] == tok.sha256

    # Back to a trained SentencePiece model: the Hugging Face files leave the work directory.
    p = retro_run(SMOKE, f"workdir={w}", *SMALL, CORPUS_ONLY, "tokenizer.model=null", *overrides)
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(f.name for f in (w / "tokenizer").iterdir()) == ["tokenizer.model"]


def test_special_tokens_in_text_stay_text_and_the_special_tokens_map_counts(hf_folder, tmp_path):
    """Text spelling "<|endoftext|>" is not the EOS (SentencePiece never matches its control
    symbols either); special_tokens_map.json overrides tokenizer_config.json, as in transformers."""
    tok = open_tokenizer(hf_folder)
    ids = tok.encode(["a <|endoftext|> b"])[0]
    assert tok.eod_id not in ids and tok.decode(ids) == "a <|endoftext|> b"

    folder = tmp_path / "tok"
    shutil.copytree(hf_folder, folder)
    _config(folder, eos_token=None)
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|pad|>", "pad_token": EOS}))
    mapped = open_tokenizer(folder)
    assert (mapped.eod_id, mapped.pad_id) == (tok.tk.token_to_id("<|pad|>"), tok.eod_id)
    # Packages hold no special_tokens_map.json: the config they hold says the same ids.
    from retro_toolkit.collections.text.tokenizer import tokenizer_from_files

    again = tokenizer_from_files(mapped.files(), "package")
    assert again.special_ids() == mapped.special_ids() and again.sha256 == mapped.sha256
