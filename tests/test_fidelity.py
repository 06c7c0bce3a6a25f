"""Our Retro computes what both upstream Retros compute, at equal weights.

tests/fidelity/data/<config>.pt were written by tests/fidelity/make_mcore_reference.py in a
virtual environment with megatron-core 0.15.3, and legacy_<config>.pt by
tests/fidelity/make_legacy_reference.py running legacy Megatron-LM (the InstructRetro tag);
their usage lines say how. Each holds weights under upstream's names, random tokens and
neighbours, and the float32 logits upstream computed. Each is loaded through the importer's
mapping (checkpoint.megatron_core, checkpoint.megatron_legacy) into a model of the matching
flavour and must give the same logits under both attention backends.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from retro_toolkit.checkpoint import megatron_core
from retro_toolkit.checkpoint.nemo import load_full
from retro_toolkit.collections.retro import build_model, config_from_model_section, initialize
from tests.test_export import tokenizer_file  # noqa: F401 (fixture)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")

DATA = Path(__file__).parent / "fidelity" / "data"
CONFIGS = ("instructretro", "nine_layers", "classic")
TOLERANCE = 1e-5  # max |ours - reference| / max |reference|, float32


def section_of(c: dict, **over) -> dict:
    """Our model section for a reference config (the script's own keys)."""
    return {
        "arch": "retro", "num_layers": c["num_layers"], "hidden_size": c["hidden_size"],
        "num_attention_heads": c["num_attention_heads"], "ffn_hidden_size": c["ffn_hidden_size"],
        "seq_length": c["seq"], "chunk_length": c["chunk"], "num_neighbors": c["k"],
        "num_retrieved_chunks": c["retrieved_chunks"], "encoder_num_layers": 2, "cca_layers": None,
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "encoder_hidden_dropout": 0.0,
        "encoder_attention_dropout": 0.0, "swiglu": c["swiglu"], "add_bias_linear": c["add_bias_linear"],
        "apply_layernorm_1p": c["layernorm_1p"], "untie_embeddings_and_output_weights": c["untie"],
        "position_embedding_type": c["position"], "rotary_percent": c["rotary_percent"],
        "flavor": megatron_core.FLAVOR, **over,
    }


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    initialize(1, seed=5)


def reference(name: str) -> dict:
    return torch.load(DATA / f"{name}.pt", weights_only=True)


def ours(ref: dict, core_attention: str = "sdpa", **over):
    cfg, args = config_from_model_section(section_of(ref["config"], **over), vocab_size=ref["vocab_size"],
                                          core_attention=core_attention)
    model = build_model(cfg, args).eval()
    load_full(model, megatron_core.to_toolkit(ref["state_dict"]), f"{ref['config']} reference")
    return model


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
@pytest.mark.parametrize("core_attention", ["sdpa", "unfused"])
@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_megatron_core_0_15_3_at_equal_weights(name, core_attention):
    ref = reference(name)
    assert ref["versions"]["megatron-core"] == "0.15.3"
    model = ours(ref, core_attention=core_attention)
    assert model.config.core_attention == core_attention
    logits = model(ref["tokens"], ref["neighbor_tokens"])
    assert logits.shape == ref["logits"].shape
    assert rel_diff(logits, ref["logits"]) < TOLERANCE


@torch.no_grad()
@pytest.mark.parametrize("name", CONFIGS)
def test_each_upstream_difference_moves_the_logits(name):
    """The reference tells the flavours apart: the legacy flavour (final norm, un-normalised
    encoder residual) and encoder rotary positions are each far outside the tolerance. The legacy
    model has a final norm the reference lacks, so it gets the identity norm (weight 1, bias 0)."""
    ref = reference(name)
    legacy = {**ref["state_dict"]}
    one = 0.0 if ref["config"]["layernorm_1p"] else 1.0
    h = ref["config"]["hidden_size"]
    legacy["decoder.final_layernorm.weight"] = torch.full((h,), one)
    legacy["decoder.final_layernorm.bias"] = torch.zeros(h)
    cfg, args = config_from_model_section(section_of(ref["config"], flavor="megatron_legacy"),
                                          vocab_size=ref["vocab_size"])
    model = build_model(cfg, args).eval()
    load_full(model, megatron_core.to_toolkit(legacy), "legacy")
    assert rel_diff(model(ref["tokens"], ref["neighbor_tokens"]), ref["logits"]) > 100 * TOLERANCE
    if ref["config"]["position"] == "rope":
        rotary = ours(ref, encoder_rotary=True)
        assert rel_diff(rotary(ref["tokens"], ref["neighbor_tokens"]), ref["logits"]) > 100 * TOLERANCE


def test_mapping_errors_name_the_tensor():
    from retro_toolkit.errors import UserError

    ref = reference("nine_layers")
    cfg, args = config_from_model_section(section_of(ref["config"]), vocab_size=ref["vocab_size"])
    model = build_model(cfg, args)
    state = megatron_core.to_toolkit(ref["state_dict"])
    lost = "decoder.layers.5.cross_attention.encoder.layers.0.cross_attention.linear_kv.weight"
    with pytest.raises(UserError, match=rf"missing 1: {lost.replace('.', '[.]')}"):
        load_full(model, {k: v for k, v in state.items() if k != lost}, "x")
    with pytest.raises(UserError, match=r"unexpected 1: decoder[.]final_layernorm[.]weight"):
        load_full(model, {**state, "decoder.final_layernorm.weight": torch.ones(32)}, "x")


@torch.no_grad()
def test_megatron_core_dist_checkpoint_imports_to_a_package_with_equal_logits(tmp_path, tokenizer_file):  # noqa: F811
    """import-megatron reads a Megatron-LM training checkpoint in megatron-core's torch_dist format
    (written by megatron-core 0.15.3 itself), takes the shape from its args, and the package gives
    the reference logits."""
    from retro_toolkit.checkpoint.megatron_legacy import import_checkpoint
    from retro_toolkit.checkpoint.nemo import restore

    ref = reference("nine_layers")
    lines = []
    out = import_checkpoint(DATA / "nine_layers_torch_dist", tokenizer_file, tmp_path / "m.nemo", log=lines.append)
    assert "megatron-core dist checkpoint" in lines[0]
    pkg = restore(out, device="cpu")
    assert pkg.config["flavor"] == "megatron_core" and pkg.config["encoder_rotary"] is False
    assert pkg.model.config.cca_layers == [6, 9]
    pkg.model.config.neighbor_pad_id = None  # upstream attends to pad tokens; the random neighbours hold some
    assert rel_diff(pkg.model(ref["tokens"], ref["neighbor_tokens"]), ref["logits"]) < TOLERANCE


def test_a_dist_checkpoint_missing_a_tensor_is_refused_naming_it(tmp_path, tokenizer_file):  # noqa: F811
    import shutil

    from retro_toolkit.checkpoint.megatron_legacy import import_checkpoint
    from retro_toolkit.errors import UserError

    ckpt = tmp_path / "ckpt"
    shutil.copytree(DATA / "nine_layers_torch_dist", ckpt)
    (ckpt / "iter_0000001" / "metadata.json").write_text('{"sharded_backend": "zarr"}')
    with pytest.raises(UserError, match=r"only megatron-core's torch_dist format is read"):
        import_checkpoint(ckpt, tokenizer_file, tmp_path / "m.nemo")
    (ckpt / "iter_0000001" / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (ckpt / "iter_0000001" / "common.pt").unlink()
    with pytest.raises(UserError, match=r"has no common.pt"):
        import_checkpoint(ckpt, tokenizer_file, tmp_path / "m.nemo")


@torch.no_grad()
def test_a_tensor_parallel_2_dist_checkpoint_imports_with_its_logits(tmp_path, tokenizer_file):  # noqa: F811
    """Written by megatron-core 0.15.3 under torchrun at TP 2 (SwiGLU halves and q/k/v split per
    rank); the package, at TP 1, gives the logits the sharded upstream model computed."""
    from retro_toolkit.checkpoint.megatron_legacy import import_checkpoint
    from retro_toolkit.checkpoint.nemo import restore

    ref = torch.load(DATA / "nine_layers_tp2.pt", weights_only=True)
    out = import_checkpoint(DATA / "nine_layers_tp2_torch_dist", tokenizer_file, tmp_path / "m.nemo",
                            log=lambda s: None)
    pkg = restore(out, device="cpu")
    pkg.model.config.neighbor_pad_id = None
    assert rel_diff(pkg.model(ref["tokens"], ref["neighbor_tokens"]), ref["logits"]) < TOLERANCE


@torch.no_grad()
@pytest.mark.parametrize("core_attention", ["sdpa", "unfused"])
@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_legacy_megatron_lm_at_equal_weights(name, core_attention):
    """The importer's legacy path: the model section from the run's args (completed by the Retro
    workdir's args.json, where legacy Megatron-LM kept the chunk length), legacy tensor names
    through its rename, flavour megatron_legacy."""
    from retro_toolkit.checkpoint.megatron_args import section_from_args
    from retro_toolkit.checkpoint.megatron_legacy_names import rename

    ref = torch.load(DATA / f"legacy_{name}.pt", weights_only=True)
    section = section_from_args({**ref["args"], **ref["retro_args"]}, name)
    assert section["flavor"] == "megatron_legacy"
    state, unknown = rename(ref["state_dict"], section, name)
    assert not unknown
    cfg, args = config_from_model_section(section, vocab_size=ref["vocab_size"], core_attention=core_attention)
    model = build_model(cfg, args).eval()
    load_full(model, state, name)
    model.config.neighbor_pad_id = None  # upstream attends to every neighbour token
    assert rel_diff(model(ref["tokens"], ref["neighbor_tokens"]), ref["logits"]) < TOLERANCE
    if core_attention == "sdpa":  # the reference tells the flavours apart
        cfg, args = config_from_model_section({**section, "flavor": "megatron_core"}, vocab_size=ref["vocab_size"])
        core = build_model(cfg, args).eval()
        load_full(core, {k: v for k, v in state.items() if not k.startswith("decoder.final_layernorm.")}, name)
        core.config.neighbor_pad_id = None
        assert rel_diff(core(ref["tokens"], ref["neighbor_tokens"]), ref["logits"]) > 100 * TOLERANCE


@torch.no_grad()
@pytest.mark.parametrize("trust", [False, True])
@pytest.mark.parametrize("ckpt,ref_file", [("legacy_nine_layers_checkpoint", "legacy_nine_layers.pt"),
                                           ("legacy_nine_layers_tp2_checkpoint", "legacy_nine_layers_tp2.pt")])
def test_a_checkpoint_saved_by_legacy_megatron_lm_imports_with_its_logits(tmp_path, tokenizer_file, ckpt, ref_file,  # noqa: F811
                                                                          trust):
    """Saved by the InstructRetro tag's own save_checkpoint (release/mp_rank_NN/model_optim_rng.pt,
    the full args with ModelType.retro_decoder, a member megatron-core 0.16 no longer has), at TP
    1 and 2: `retro-run import-megatron --retro-args` gives a package with upstream's logits,
    with weights_only loading and with --trust-checkpoint."""
    import json

    from retro_toolkit.checkpoint.megatron_legacy import import_checkpoint
    from retro_toolkit.checkpoint.nemo import restore

    ref = torch.load(DATA / ref_file, weights_only=True)
    (tmp_path / "args.json").write_text(json.dumps(ref["retro_args"]))
    out = import_checkpoint(DATA / ckpt, tokenizer_file, tmp_path / "m.nemo", log=lambda s: None,
                            retro_args=tmp_path / "args.json", trust=trust)
    pkg = restore(out, device="cpu")
    assert pkg.config["flavor"] == "megatron_legacy"
    pkg.model.config.neighbor_pad_id = None
    assert rel_diff(pkg.model(ref["tokens"], ref["neighbor_tokens"]), ref["logits"]) < TOLERANCE
