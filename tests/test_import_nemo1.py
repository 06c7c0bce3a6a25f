"""NeMo 1.x megatron_gpt packages imported as GPTs: every weights layout NeMo wrote.

The packages are assembled here in NeMo's layout (model_config.yaml naming MegatronGPTModel, the
tokenizer as nemo:<file>, weights under NeMo's `model.` prefix) from a random model of ours:
legacy names in one file and in two tensor-parallel shards (with NeMo's unfused SwiGLU),
megatron-core names with Transformer Engine's fused norms under megatron_amp_O2's
`model.module.`, and a model_weights/ dist checkpoint written by megatron-core's own
dist_checkpointing. NeMo itself is not installed here, so only the last is written by upstream
code; the names follow NeMo 1.x's GPT-2B-001 and Nemotron-3-8B packages.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from retro_toolkit.checkpoint import nemo
from retro_toolkit.checkpoint.gpt_sources import import_gpt, kind_of
from retro_toolkit.errors import UserError
from tests.test_export import VOCAB, random_model, tokenizer_file  # noqa: F401 (fixture)
from tests.test_megatron_import import split

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")

# GPT-2B-001's kind of model: LayerNorm1p, SwiGLU, no biases, half the channels rotated, untied.
SECTION = dict(arch="gpt", num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=64,
               chunk_length=64, swiglu=True, apply_layernorm_1p=True, add_bias_linear=False, rotary_percent=0.5,
               untie_embeddings_and_output_weights=True, vocab_size=VOCAB, hidden_dropout=0.0, attention_dropout=0.0)
CONFIG = dict(target="nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel",
              num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, encoder_seq_length=64,
              max_position_embeddings=64, normalization="layernorm1p", activation="fast-swiglu", bias=False,
              position_embedding_type="rope", rotary_percentage=0.5, share_embeddings_and_output_weights=False,
              layernorm_epsilon=1e-5, mcore_gpt=False, precision=32,
              tokenizer={"library": "sentencepiece", "model": "nemo:3f2a_tokenizer.model"})
LEGACY = [("embedding.word_embeddings.", "language_model.embedding.word_embeddings."),
          ("output_layer.", "language_model.output_layer."),
          ("decoder.final_layernorm.", "language_model.encoder.final_layernorm."),
          ("decoder.layers.", "language_model.encoder.layers.")]
LEGACY_LAYER = [("input_layernorm.", "input_layernorm."), ("self_attention.linear_qkv.", "self_attention.query_key_value."),
                ("self_attention.linear_proj.", "self_attention.dense."), ("pre_mlp_layernorm.", "post_attention_layernorm."),
                ("mlp.linear_fc1.", "mlp.dense_h_to_4h."), ("mlp.linear_fc2.", "mlp.dense_4h_to_h.")]


def legacy_name(ours: str) -> str:
    """NeMo's legacy (mcore_gpt false) spelling, written out independently of the importer."""
    for a, b in LEGACY:
        if ours.startswith(a):
            rest = ours[len(a):]
            if a == "decoder.layers.":
                i, rest = rest.split(".", 1)
                rest = next(y + rest[len(x):] for x, y in LEGACY_LAYER if rest.startswith(x))
                return f"{b}{i}.{rest}"
            return b + rest
    raise AssertionError(ours)


def te_name(ours: str) -> str:
    """megatron-core's names with Transformer Engine's fused norms (mcore_gpt true)."""
    return (ours.replace(".input_layernorm.", ".self_attention.linear_qkv.layer_norm_")
            .replace(".pre_mlp_layernorm.", ".mlp.linear_fc1.layer_norm_"))


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def pack(path: Path, config: dict, files: dict[str, bytes], folder: Path | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in {"model_config.yaml": yaml.safe_dump(config).encode(), **files}.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if folder is not None:
            tar.add(folder, arcname="./model_weights")
    return path


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(9))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens())


def imported_logits(pkg: Path, tmp_path: Path) -> torch.Tensor:
    assert kind_of(pkg) == "nemo1"
    out = import_gpt(pkg, tmp_path / "ours.nemo", log=lambda _: None)
    return logits(nemo.restore(out, device="cpu").model)


def test_legacy_names_in_one_file(tmp_path, tokenizer_file):  # noqa: F811
    model = random_model(31, SECTION)
    weights = {"model." + legacy_name(k): v for k, v in state(model).items()}
    pkg = pack(tmp_path / "gpt2b.nemo", CONFIG, {"3f2a_tokenizer.model": tokenizer_file.read_bytes(),
                                                 "model_weights.ckpt": saved(weights)})
    assert torch.equal(imported_logits(pkg, tmp_path), logits(model))


def test_legacy_names_in_two_tensor_parallel_shards_with_unfused_swiglu(tmp_path, tokenizer_file):  # noqa: F811
    model = random_model(32, SECTION)
    legacy = {legacy_name(k): v for k, v in state(model).items()}
    files = {"3f2a_tokenizer.model": tokenizer_file.read_bytes()}
    shards = {k: split(k, v, 2) for k, v in legacy.items()}
    for r in range(2):
        weights = {}
        for k, parts in shards.items():
            if ".dense_h_to_4h." in k:  # NeMo's "swiglu": gate and up in two matrices per rank
                gate, up = torch.chunk(parts[r], 2)
                weights["model." + k], weights["model." + k.replace("dense_h_to_4h", "dense_h_to_4h_2")] = gate, up
            else:
                weights["model." + k] = parts[r]
        files[f"mp_rank_{r:02d}/model_weights.ckpt"] = saved(weights)
    pkg = pack(tmp_path / "tp2.nemo", {**CONFIG, "activation": "swiglu", "tensor_model_parallel_size": 2}, files)
    assert torch.equal(imported_logits(pkg, tmp_path), logits(model))


def mcore_split(name: str, t: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """One megatron-core tensor as the tensor-parallel ranks hold it (no SwiGLU here)."""
    if any(p in name for p in ("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "word_embeddings.",
                                "output_layer.")):
        return list(torch.chunk(t, tp, dim=0))
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return list(torch.chunk(t, tp, dim=1))
    return [t] * tp


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_core_names_with_fused_norms_under_amp_o2(tmp_path, tokenizer_file, tp):  # noqa: F811
    section = {**SECTION, "swiglu": False, "squared_relu": True, "num_query_groups": 2}  # Nemotron's MLP, GQA
    model = random_model(33, section)
    names = {"model.module." + te_name(k): v for k, v in state(model).items()}
    files = {"3f2a_tokenizer.model": tokenizer_file.read_bytes()}
    if tp == 1:
        files["model_weights.ckpt"] = saved(names)
    for r in range(tp if tp > 1 else 0):
        files[f"mp_rank_{r:02d}/model_weights.ckpt"] = saved({k: mcore_split(k, v, tp)[r] for k, v in names.items()})
    config = {**CONFIG, "mcore_gpt": True, "megatron_amp_O2": True, "activation": "squared-relu", "num_query_groups": 2}
    pkg = pack(tmp_path / "nemotron.nemo", config, files)
    assert torch.equal(imported_logits(pkg, tmp_path), logits(model))


def test_dist_weights_written_by_megatron_core(tmp_path, tokenizer_file):  # noqa: F811
    from megatron.core import dist_checkpointing

    model = random_model(34, SECTION)
    (tmp_path / "w").mkdir()
    dist_checkpointing.save(model.sharded_state_dict(prefix="model."), str(tmp_path / "w"))
    pkg = pack(tmp_path / "dist.nemo", {**CONFIG, "mcore_gpt": True},
               {"3f2a_tokenizer.model": tokenizer_file.read_bytes()}, folder=tmp_path / "w")
    assert torch.equal(imported_logits(pkg, tmp_path), logits(model))


def test_packages_it_cannot_read_are_refused(tmp_path, tokenizer_file):  # noqa: F811
    model = random_model(35, SECTION)
    legacy = {"model." + legacy_name(k): v for k, v in state(model).items()}
    weights = saved(legacy)
    norm = "model.language_model.encoder.layers.0.input_layernorm.weight"
    other = saved({**legacy, norm: legacy[norm] + 1})  # a replicated tensor that differs between ranks
    tok = {"3f2a_tokenizer.model": tokenizer_file.read_bytes()}
    cases = [
        ({**CONFIG, "activation": "geglu"}, {**tok, "model_weights.ckpt": weights}, "activation 'geglu' is not one"),
        ({**CONFIG, "tokenizer": {"library": "huggingface", "type": "gpt2"}}, {"model_weights.ckpt": weights},
         "only a SentencePiece model inside the package"),
        (CONFIG, {"model_weights.ckpt": weights}, "names tokenizer nemo:3f2a_tokenizer.model, which the package lacks"),
        (CONFIG, {**tok, "mp_rank_00/model_weights.ckpt": weights, "mp_rank_02/model_weights.ckpt": weights},
         r"\['mp_rank_00', 'mp_rank_02'\] are not mp_rank_00.. in sequence"),
        (CONFIG, {**tok, "mp_rank_00_000/model_weights.ckpt": weights}, "pipeline-parallel shards are not read"),
        (CONFIG, {**tok, "mp_rank_00/model_weights.ckpt": weights, "mp_rank_01/model_weights.ckpt": other},
         "input_layernorm.weight should be identical on every tensor-parallel rank but differs"),
        (CONFIG, tok, "holds no weights"),
    ]
    for i, (config, files, message) in enumerate(cases):
        with pytest.raises(UserError, match=message):
            import_gpt(pack(tmp_path / f"bad{i}.nemo", config, files), tmp_path / "x.nemo", log=lambda _: None)
    assert not (tmp_path / "x.nemo").exists()
