"""Hugging Face GPTs (Llama, Mistral, Qwen2) imported as .nemo packages compute what transformers
computes: tiny random models written by save_pretrained (one in several safetensors shards)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from retro_toolkit.checkpoint import nemo
from retro_toolkit.checkpoint.gpt_sources import import_gpt
from retro_toolkit.collections.retro import build_model, config_from_model_section, initialize
from retro_toolkit.errors import UserError
from tests.test_export import VOCAB, tokenizer_file  # noqa: F401 (fixture)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")

SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500000.0)


def _hf_model(kind: str):
    import transformers

    if kind == "llama":  # Llama 3.1's RoPE scaling
        cfg = transformers.LlamaConfig(**SHAPE, tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": SHAPE["rope_theta"], "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    elif kind == "nemotron":
        cfg = transformers.NemotronConfig(**{k: v for k, v in SHAPE.items() if k != "rms_norm_eps"}, norm_eps=1e-5,
                                          partial_rotary_factor=0.5, tie_word_embeddings=False)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**SHAPE, sliding_window=4096, tie_word_embeddings=False)
    else:
        cfg = transformers.Qwen2Config(**SHAPE, tie_word_embeddings=True, use_sliding_window=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    with torch.no_grad():  # every tensor random, norms too, so a wrong mapping shows
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(3))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "nemotron"])
def imported(request, tmp_path_factory, tokenizer_file):  # noqa: F811
    kind = request.param
    folder = tmp_path_factory.mktemp(kind)
    hf = _hf_model(kind)
    # Llama in several shards (model.safetensors.index.json), the others in one file.
    hf.save_pretrained(folder, safe_serialization=True, max_shard_size="40KB" if kind == "llama" else "1GB")
    with torch.no_grad():
        want = hf(_tokens()).logits
    pkg = import_gpt(folder, folder / "m.nemo", tokenizer=tokenizer_file, log=lambda _: None)
    return kind, folder, pkg, want


def test_imported_gpt_equals_transformers(imported):
    kind, folder, pkg, want = imported
    if kind == "llama":
        assert (folder / "model.safetensors.index.json").is_file()
    loaded = nemo.restore(pkg, device="cpu")
    with torch.no_grad():
        got = loaded.model(_tokens())
    assert got.shape == want.shape
    assert _relative(got, want) < 1e-5, kind


def test_retro_with_the_gate_at_zero_equals_transformers(imported):
    kind, _, pkg, want = imported
    gpt = nemo.restore(pkg, device="cpu").model
    section = {**nemo.section_of(nemo.read_config(pkg)), "arch": "retro", "cca_layers": [2], "chunk_length": 16,
               "retrieval_gate": 0.0}
    initialize(1, seed=1)
    config, args = config_from_model_section(section)
    retro = build_model(config, args).eval()
    missing, unexpected = retro.load_state_dict(gpt.state_dict(), strict=False)
    assert not unexpected and missing and all("cross_attention" in m or "pre_cross_attn" in m for m in missing)
    neighbours = torch.randint(0, VOCAB, (2, 4, 2, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = retro(_tokens(), neighbours)
    assert _relative(got, want) < 1e-5, kind


def test_bad_checkpoints_are_refused_naming_the_file(tmp_path, tokenizer_file):  # noqa: F811
    hf = _hf_model("llama")
    hf.save_pretrained(tmp_path / "m", safe_serialization=True, max_shard_size="40KB")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "m" / shard).unlink()
    with pytest.raises(UserError, match=f"lists 1 shard.*{shard}.*Download every shard"):
        import_gpt(tmp_path / "m", tmp_path / "x.nemo", tokenizer=tokenizer_file)
    from tests.conftest import retro_run

    p = retro_run("import-gpt", str(tmp_path / "m"), "--out", str(tmp_path / "x.nemo"), "--tokenizer", str(tokenizer_file))
    assert p.returncode == 2 and f"lists 1 shard(s) that are not in the folder: {shard}" in p.stderr

    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(UserError, match="model_type 'gpt2' is not one this importer reads"):
        import_gpt(tmp_path / "gpt2", tmp_path / "x.nemo", tokenizer=tokenizer_file)

    (tmp_path / "scaled").mkdir()
    scaled = {**cfg, "rope_parameters": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0}}
    (tmp_path / "scaled" / "config.json").write_text(json.dumps(scaled))
    with pytest.raises(UserError, match="RoPE scaling .*yarn.*the only scaling this toolkit's rotary embedding applies "
                                        "is llama3"):
        import_gpt(tmp_path / "scaled", tmp_path / "x.nemo", tokenizer=tokenizer_file)

    small = _hf_model("qwen2")
    small.config.vocab_size = 8
    with pytest.raises(UserError, match="tokenizer .*tokenizer.model has 96 ids but the model's embedding has 8 rows"):
        small.save_pretrained(tmp_path / "q", safe_serialization=True)
        config = json.loads((tmp_path / "q" / "config.json").read_text())
        (tmp_path / "q" / "config.json").write_text(json.dumps({**config, "vocab_size": 8}))
        import_gpt(tmp_path / "q", tmp_path / "x.nemo", tokenizer=tokenizer_file)
    assert not (tmp_path / "x.nemo").exists()


@pytest.mark.slow
def test_init_from_an_imported_llama_trains_retro_with_the_decoder_frozen(small_db, tmp_path):
    import transformers

    from retro_toolkit.collections.retro import checkpointing as ckpt
    from retro_toolkit.collections.retro.engine import build
    from retro_toolkit.collections.text.tokenizer import open_tokenizer
    from retro_toolkit.recipe import load_recipe
    from tests.conftest import SMALL, SMOKE, retro_run
    from tests.test_pretrain import TRAIN, copy_db, losses

    w = copy_db(small_db, tmp_path / "fit")
    tok = w / "tokenizer" / "tokenizer.model"
    # retro_tiny's decoder as a Llama with two key/value heads.
    cfg = transformers.LlamaConfig(vocab_size=open_tokenizer(tok).vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "llama")
    shutil.copyfile(tok, tmp_path / "llama" / "tokenizer.model")
    pkg = import_gpt(tmp_path / "llama", tmp_path / "llama.nemo", log=lambda _: None)
    llama = ["model.normalization=RMSNorm", "model.swiglu=true", "model.add_bias_linear=false",
             "model.num_query_groups=2", "model.untie_embeddings_and_output_weights=true"]
    common = [f"workdir={w}", *SMALL, *TRAIN, "pretrain.train_iters=2", "pretrain.freeze_decoder=true",
              "stages=[tokenizer,prepare_corpus,build_db,pretrain]"]

    # The package, with the embeddings left tied: not this model.
    refused = retro_run(SMOKE, *common, f"pretrain.init_from={pkg}", *llama[:-1])
    assert refused.returncode == 2
    assert "untie_embeddings_and_output_weights: checkpoint True vs recipe False" in refused.stdout + refused.stderr

    # The Hugging Face folder itself, converted on the way in.
    p = retro_run(SMOKE, *common, f"pretrain.init_from={tmp_path / 'llama'}", *llama)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "skip  build_db" in p.stdout
    assert all(math.isfinite(x) for x in losses(w)) and len(losses(w)) == 2
    retro, _, _ = build(load_recipe(str(w / "recipe.resolved.yaml")), "retro")
    ckpt.load_weights(ckpt.latest(w / "checkpoints" / "pretrain"), retro)
    trained = retro.state_dict()
    start = nemo.restore(pkg, device="cpu").model.state_dict()
    decoder = [k for k, t in start.items() if isinstance(t, torch.Tensor)]
    assert len(decoder) == 2 * 6 + 3
    for k in decoder:
        assert torch.equal(trained[k], start[k]), k  # loaded and frozen: bit-identical after training


def test_export_hf_gives_the_imported_model_back(imported, tmp_path):
    import transformers

    from retro_toolkit.checkpoint.hf_export import export_hf

    kind, _, pkg, want = imported
    out = export_hf(pkg, tmp_path / "back", log=lambda _: None)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert back.config.model_type == {"mistral": "llama"}.get(kind, kind)
    with torch.no_grad():
        got = back(_tokens()).logits
    assert _relative(got, want) < 1e-5, kind
    with pytest.raises(UserError, match="exists; give a new folder"):
        export_hf(pkg, out)


def test_export_hf_refuses_a_decoder_no_transformers_class_computes(tmp_path, tokenizer_file):  # noqa: F811
    from retro_toolkit.checkpoint.export import write_model
    from retro_toolkit.checkpoint.hf_export import export_hf
    from tests.test_export import SECTION, random_model

    pkg = write_model(random_model(1), SECTION, tokenizer_file, tmp_path / "m.nemo")  # LayerNorm-1p + SwiGLU + biases
    with pytest.raises(UserError, match=r"no transformers class computes this decoder: normalization LayerNorm, "
                                        r"swiglu True, squared_relu False, add_bias_linear True"):
        export_hf(pkg, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_the_model_piece_import_gpt_writes_makes_a_recipe_that_init_from_accepts(imported):
    from retro_toolkit.collections.retro.checkpointing import EVAL_FREE_KEYS, RETRIEVAL_KEYS, check_model_section
    from retro_toolkit.collections.retro.engine import model_section
    from retro_toolkit.recipe import load_recipe
    from tests.conftest import SMOKE

    kind, _, pkg, _ = imported
    piece = pkg.with_name("m.model.yaml")
    recipe = load_recipe(SMOKE, [f"model={piece}", "model.cca_layers=[2]"])  # 2 layers: Retro's rule has none
    assert recipe.model.arch == "retro" and recipe.model.num_query_groups == 2
    check_model_section(pkg, nemo.section_of(nemo.read_config(pkg)), model_section(recipe, "retro"),
                        free=EVAL_FREE_KEYS | RETRIEVAL_KEYS)  # raises naming any key that differs


def test_init_from_checks_the_work_directory_tokenizer_against_the_one_the_package_carries(imported, tmp_path,
                                                                                           tokenizer_file):  # noqa: F811
    from retro_toolkit.collections.retro.init_from_external import init_from_external
    from retro_toolkit.collections.text.sentencepiece_tokenizer import train_sentencepiece

    kind, _, pkg, want = imported
    section = nemo.section_of(nemo.read_config(pkg))
    initialize(1, seed=2)
    config, args = config_from_model_section(section)
    gpt = build_model(config, args).eval()
    (tmp_path / "w" / "tokenizer").mkdir(parents=True)
    texts = ["another corpus with another vocabulary: the tokenizer differs from the package's own one",
             "pack my box with five dozen liquor jugs; sphinx of black quartz, judge my vow 0123456789"] * 30
    train_sentencepiece(texts, tmp_path / "w" / "tokenizer" / "tokenizer.model", VOCAB, "bpe", 1.0, 10000, False, 1)
    with pytest.raises(UserError, match="was trained with another tokenizer .*Use the checkpoint's tokenizer"):
        init_from_external(pkg, "package", gpt, section, tmp_path / "w", print)
    shutil.copyfile(tokenizer_file, tmp_path / "w" / "tokenizer" / "tokenizer.model")
    new, loaded = init_from_external(pkg, "package", gpt, section, tmp_path / "w", print)
    assert not new and loaded
    with torch.no_grad():
        assert _relative(gpt(_tokens()), want) < 1e-5, kind


@pytest.mark.parametrize("weights", ["file", "dist"])
def test_a_package_is_read_as_a_gpt_source_without_building_its_model(tmp_path, tokenizer_file, weights):  # noqa: F811
    from retro_toolkit.checkpoint.export import write_model
    from retro_toolkit.checkpoint.gpt_sources import kind_of, read
    from tests.test_export import SECTION, random_model

    model = random_model(4, {**SECTION, "arch": "gpt"})
    pkg = write_model(model, {**SECTION, "arch": "gpt"}, tokenizer_file, tmp_path / "g.nemo", None, weights)
    assert kind_of(pkg) == "package"
    source = read(pkg, "package")
    assert source.tokenizer.proto == tokenizer_file.read_bytes() and source.section["arch"] == "gpt"
    want = nemo.full_state(model)
    assert sorted(source.tensors) == sorted(want)
    assert all(torch.equal(source.tensors[k], want[k]) for k in want)


MEMORY_SCRIPT = r"""
import sys, threading, time
import torch, transformers
from retro_toolkit.checkpoint.gpt_sources import read
from retro_toolkit.checkpoint.nemo import build_for
from retro_toolkit.collections.retro.full_state_dict import load_full_state_dict

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

folder, tokenizer = sys.argv[1], sys.argv[2]
from retro_toolkit.collections.text.tokenizer import open_tokenizer
source = read(folder, "hugging_face")
model = build_for(source.section, open_tokenizer(tokenizer), 1, torch.float32, "cpu")
with torch.no_grad():
    for p in model.parameters():
        p.zero_()  # allocated but untouched memory is not resident yet: the baseline holds the model
base = peak = anon()
done = threading.Event()
def sample():
    global peak
    while not done.is_set():
        peak = max(peak, anon()); time.sleep(0.001)
t = threading.Thread(target=sample); t.start()
source = read(folder, "hugging_face")
load_full_state_dict(model, source.tensors)
done.set(); t.join()
print(max(peak, anon()) - base)
"""


@pytest.mark.slow
def test_init_from_a_hugging_face_folder_holds_one_tensor_at_a_time_not_the_checkpoint(tmp_path, tokenizer_file):  # noqa: F811
    """Reading a Hugging Face GPT and loading it into a model adds about one fused tensor to the
    process, not all of them: every rank of a pretrain with init_from does this. safetensors maps
    the file (its pages are page cache), but the fused query/key/value and gate/up tensors are
    new memory: made all before loading, they would add 168 MiB here."""
    import subprocess
    import sys

    import transformers

    cfg = transformers.LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=24,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False)
    transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).save_pretrained(
        tmp_path / "llama", safe_serialization=True, max_shard_size="100MB")
    qkv = (512 + 2 * 2 * 64) * 512 * 4
    fused = cfg.num_hidden_layers * (qkv + 2 * 1408 * 512 * 4)  # 168 MiB
    p = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "llama"), str(tokenizer_file)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    grew = int(p.stdout.strip().splitlines()[-1])
    assert grew < fused / 4, (grew / 2**20, fused / 2**20)  # measured: 20 MiB
