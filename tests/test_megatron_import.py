"""Import of Megatron-LM legacy Retro checkpoints, from a checkpoint this test writes in
that layout: latest_checkpointed_iteration.txt = release, release/mp_rank_0X/model_optim_rng.pt,
legacy ParallelTransformer names, two tensor-parallel shards (SwiGLU halves per rank)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch

from retro_toolkit.checkpoint import nemo
from retro_toolkit.checkpoint.megatron_legacy import import_checkpoint
from retro_toolkit.errors import UserError
from tests.conftest import retro_run
from tests.test_export import VOCAB, inputs, logits_of, random_model, tokenizer_file  # noqa: F401 (fixture)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")

# 6 layers: Retro's default rule puts chunked cross-attention in layer 6 only, as the legacy code did.
SECTION = dict(arch="retro", num_layers=6, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=32,
               chunk_length=8, num_neighbors=2, num_retrieved_chunks=2, encoder_num_layers=2, cca_layers=None,
               hidden_dropout=0.0, attention_dropout=0.0, encoder_hidden_dropout=0.0, encoder_attention_dropout=0.0,
               swiglu=True, apply_layernorm_1p=True, add_bias_linear=True, rotary_percent=0.5,
               untie_embeddings_and_output_weights=True, vocab_size=VOCAB)
ARGS = dict(num_layers=6, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=32,
            padded_vocab_size=VOCAB, swiglu=True, position_embedding_type="rope", rotary_percent=0.5,
            untie_embeddings_and_output_weights=True, add_bias_linear=True, normalization="LayerNorm",
            apply_layernorm_1p=True, norm_epsilon=1e-5, retro_add_retriever=True, retro_chunk_length=8,
            retro_num_neighbors=2, retro_num_retrieved_chunks=2, retro_encoder_layers=2,
            tensor_model_parallel_size=2, pipeline_model_parallel_size=1, num_query_groups=None,
            group_query_attention=False, params_dtype=torch.float32)


# The legacy spelling, written out here independently of the importer's own table.
def legacy_layer(rest: str, cross_attention: bool) -> str:
    pairs = [("input_layernorm.", "input_norm."), ("self_attention.linear_qkv.", "self_attention.query_key_value."),
             ("self_attention.linear_proj.", "self_attention.dense."), ("pre_cross_attn_layernorm.", "post_attention_norm."),
             ("cross_attention.attention.linear_q.", "inter_attention.query."),
             ("cross_attention.attention.linear_kv.", "inter_attention.key_value."),
             ("cross_attention.attention.linear_proj.", "inter_attention.dense."),
             ("cross_attention.linear_q.", "inter_attention.query."), ("cross_attention.linear_kv.", "inter_attention.key_value."),
             ("cross_attention.linear_proj.", "inter_attention.dense."),
             ("pre_mlp_layernorm.", "post_inter_attention_norm." if cross_attention else "post_attention_norm."),
             ("mlp.linear_fc1.", "mlp.dense_h_to_4h."), ("mlp.linear_fc2.", "mlp.dense_4h_to_h.")]
    for ours, theirs in pairs:
        if rest.startswith(ours):
            return theirs + rest[len(ours):]
    raise AssertionError(rest)


def legacy_name(name: str, layers_with_cross: set[str]) -> str:
    fixed = {"embedding.word_embeddings.weight": "language_model.embedding.word_embeddings.weight",
             "output_layer.weight": "language_model.output_layer.weight"}
    if name in fixed:
        return fixed[name]
    if name.startswith("decoder.final_layernorm."):
        return "language_model.encoder.final_norm." + name.rsplit(".", 1)[1]
    m = re.fullmatch(r"(decoder\.layers\.(\d+)\.cross_attention\.encoder\.layers\.(\d+))\.(.+)", name)
    if m:
        return (f"language_model.encoder.layers.{m[2]}.retriever.layers.{m[3]}."
                + legacy_layer(m[4], m[1] in layers_with_cross))
    m = re.fullmatch(r"(decoder\.layers\.(\d+))\.(.+)", name)
    return f"language_model.encoder.layers.{m[2]}." + legacy_layer(m[3], m[1] in layers_with_cross)


def split(name: str, t: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """One legacy tensor as Megatron-LM's tensor-parallel ranks held it."""
    column = ("query_key_value.", "inter_attention.query.", "inter_attention.key_value.", "word_embeddings.",
              "output_layer.")
    if ".dense_h_to_4h." in name:  # SwiGLU: each rank holds its slice of both halves, [w_r; v_r]
        w, v = torch.chunk(t, 2, dim=0)
        return [torch.cat([a, b]) for a, b in zip(torch.chunk(w, tp), torch.chunk(v, tp))]
    if any(c in name for c in column):
        return list(torch.chunk(t, tp, dim=0))
    if name.endswith(("self_attention.dense.weight", "inter_attention.dense.weight", "dense_4h_to_h.weight")):
        return list(torch.chunk(t, tp, dim=1))
    return [t] * tp


def nest(flat: dict[str, torch.Tensor]) -> dict:
    """{'language_model': {'embedding': {'word_embeddings': {'weight'}}, 'encoder': {flat}, 'output_layer': ...}}"""
    lm: dict = {"embedding": {"word_embeddings": {}}, "encoder": {}, "output_layer": {}}
    for k, v in flat.items():
        rest = k[len("language_model."):]
        if rest.startswith("embedding.word_embeddings."):
            lm["embedding"]["word_embeddings"][rest.rsplit(".", 1)[1]] = v
        elif rest.startswith("encoder."):
            lm["encoder"][rest[len("encoder."):]] = v
        else:
            lm["output_layer"][rest.rsplit(".", 1)[1]] = v
    return {"language_model": lm}


def write_legacy(folder: Path, model, tp: int = 2, extra: dict | None = None, drop: str | None = None,
                 args: dict | None = None, rng: bool = False, pickled: bool = False) -> Path:
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    cross = {k.rsplit(".pre_cross_attn_layernorm.", 1)[0] for k in state if ".pre_cross_attn_layernorm." in k}
    legacy = {legacy_name(k, cross): v for k, v in state.items()}
    legacy.update(extra or {})
    if drop:
        legacy.pop(drop)
    (folder / "release").mkdir(parents=True)
    (folder / "latest_checkpointed_iteration.txt").write_text("release")
    shards = {k: split(k, v, tp) for k, v in legacy.items()}
    for r in range(tp):
        d = folder / "release" / f"mp_rank_{r:02d}"
        d.mkdir()
        sd = {"args": argparse.Namespace(**{**ARGS, "tensor_model_parallel_size": tp, **(args or {})}),
              "checkpoint_version": 3.0, "iteration": 0,
              "model": nest({k: v[r].clone() for k, v in shards.items()})}
        if pickled:  # an object weights_only loading does not rebuild
            sd["args"].save = PurePosixPath("/checkpoints/retro")
        if rng:
            sd["rng_state"] = [{"np_rng_state": np.random.get_state(), "torch_rng_state": torch.get_rng_state()}]
        torch.save(sd, d / "model_optim_rng.pt")
    return folder


def test_a_tp2_legacy_checkpoint_imports_with_identical_logits(tmp_path, tokenizer_file):  # noqa: F811
    model = random_model(21, SECTION)
    assert model.config.cca_layers == [6]
    want = logits_of(model)
    ckpt = write_legacy(tmp_path / "legacy", model)
    out = import_checkpoint(ckpt, tokenizer_file, tmp_path / "imported.nemo", log=lambda s: None)
    pkg = nemo.restore(out)
    assert torch.equal(logits_of(pkg.model), want)
    assert pkg.section["num_layers"] == 6 and pkg.section["swiglu"] and pkg.section["rotary_percent"] == 0.5
    assert pkg.retrieval["megatron_args"]["retro_chunk_length"] == 8


def test_import_megatron_cli(tmp_path, tokenizer_file):  # noqa: F811
    ckpt = write_legacy(tmp_path / "legacy", random_model(3, SECTION))
    p = retro_run("import-megatron", str(ckpt), "--tokenizer", str(tokenizer_file), "--out", str(tmp_path / "m.nemo"))
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "m.nemo").is_file()
    p = retro_run("import-megatron", "--help")
    assert "--trust-checkpoint" in p.stdout and "weights_only" in p.stdout
    p = retro_run("import-megatron", str(tmp_path / "nope"), "--tokenizer", str(tokenizer_file), "--out", "x.nemo")
    assert p.returncode == 2 and "latest_checkpointed_iteration.txt" in p.stderr


def test_unknown_and_missing_tensors_are_listed(tmp_path, tokenizer_file):  # noqa: F811
    model = random_model(4, SECTION)
    extra = {"language_model.encoder.layers.2.adapter.weight": torch.zeros(4)}
    with pytest.raises(UserError, match=r"1 checkpoint tensors map to nothing.*layers\.2\.adapter\.weight"):
        import_checkpoint(write_legacy(tmp_path / "a", model, extra=extra), tokenizer_file, tmp_path / "a.nemo")
    gone = "language_model.encoder.layers.5.inter_attention.key_value.weight"
    with pytest.raises(UserError, match=r"missing 1: decoder\.layers\.5\.cross_attention\.attention\.linear_kv\.weight"):
        import_checkpoint(write_legacy(tmp_path / "b", model, drop=gone), tokenizer_file, tmp_path / "b.nemo")
    assert not (tmp_path / "a.nemo").exists() and not (tmp_path / "b.nemo").exists()


def test_pickled_objects_need_trust_checkpoint_but_rng_states_do_not(tmp_path, tokenizer_file):  # noqa: F811
    model = random_model(5, SECTION)
    ckpt = write_legacy(tmp_path / "legacy", model, rng=True, pickled=True)
    with pytest.raises(UserError, match=r"needs full pickle to load \(it pickles pathlib.PurePosixPath\).*--trust-checkpoint"):
        import_checkpoint(ckpt, tokenizer_file, tmp_path / "m.nemo")
    assert not (tmp_path / "m.nemo").exists()
    out = import_checkpoint(ckpt, tokenizer_file, tmp_path / "m.nemo", trust=True, log=lambda s: None)
    assert torch.equal(logits_of(nemo.restore(out).model), logits_of(model))
    # numpy and torch RNG states alone load with weights_only.
    out = import_checkpoint(write_legacy(tmp_path / "rng", model, rng=True), tokenizer_file, tmp_path / "r.nemo",
                            log=lambda s: None)
    assert out.is_file()


def test_layouts_it_cannot_read_are_refused(tmp_path, tokenizer_file):  # noqa: F811
    model = random_model(6, SECTION)
    ckpt = write_legacy(tmp_path / "pp", model, tp=1)
    (ckpt / "release" / "mp_rank_00").rename(ckpt / "release" / "mp_rank_00_000")
    with pytest.raises(UserError, match="pipeline stages"):
        import_checkpoint(ckpt, tokenizer_file, tmp_path / "x.nemo")
    ckpt = write_legacy(tmp_path / "gqa", model, args={"group_query_attention": True, "num_query_groups": 2})
    with pytest.raises(UserError, match="linear_qkv.weight: the saved tensor gives a shard of shape"):
        import_checkpoint(ckpt, tokenizer_file, tmp_path / "x.nemo")  # args say 2 groups, the weights have 4
    ckpt = write_legacy(tmp_path / "tp", model, args={"tensor_model_parallel_size": 4})
    with pytest.raises(UserError, match="tensor_model_parallel_size 4 but there are 2 shards"):
        import_checkpoint(ckpt, tokenizer_file, tmp_path / "x.nemo")
    ckpt = write_legacy(tmp_path / "pi", model, args={"rotary_seq_len_interpolation_factor": 4})
    with pytest.raises(UserError, match="rotary_seq_len_interpolation_factor 4"):
        import_checkpoint(ckpt, tokenizer_file, tmp_path / "x.nemo")
    ckpt = write_legacy(tmp_path / "post", model, args={"apply_residual_connection_post_layernorm": True})
    with pytest.raises(UserError, match="apply_residual_connection_post_layernorm"):
        import_checkpoint(ckpt, tokenizer_file, tmp_path / "x.nemo")


def test_the_chunk_length_comes_from_the_args_or_the_retro_workdir_args_json(tmp_path, tokenizer_file):  # noqa: F811
    """Legacy training args do not record the chunk length (Megatron-LM read it from the Retro
    workdir's args.json): 64 is taken and said so, or --retro-args supplies it."""
    model = random_model(6, SECTION)
    bare = {k: v for k, v in ARGS.items() if k not in ("retro_gpt_chunk_length", "retro_chunk_length")}
    ckpt = tmp_path / "c"
    write_legacy(ckpt, model, args={})
    for r in (0, 1):  # args without the chunk length, as legacy runs saved them
        f = ckpt / "release" / f"mp_rank_{r:02d}" / "model_optim_rng.pt"
        sd = torch.load(f, weights_only=False)
        sd["args"] = argparse.Namespace(**{**bare, "tensor_model_parallel_size": 2, "retro_workdir": "/w"})
        torch.save(sd, f)
    lines = []
    with pytest.raises(UserError, match=r"chunk length 64 \(64: the args do not record the chunk length; pass"):
        import_checkpoint(ckpt, tokenizer_file, tmp_path / "a.nemo", log=lines.append)
    (tmp_path / "args.json").write_text(json.dumps({"retro_gpt_chunk_length": SECTION["chunk_length"]}))
    out = import_checkpoint(ckpt, tokenizer_file, tmp_path / "b.nemo", log=lines.append,
                            retro_args=tmp_path / "args.json")
    assert nemo.restore(out).model.config.chunk_length == SECTION["chunk_length"]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="records no chunk length"):
        import_checkpoint(ckpt, tokenizer_file, tmp_path / "c.nemo", retro_args=tmp_path / "bad.json")


def test_init_from_a_tp2_legacy_gpt_checkpoint_loads_the_decoder_into_retro(tmp_path, tokenizer_file):  # noqa: F811
    import dataclasses
    import shutil

    from retro_toolkit.collections.retro.checkpointing import is_retrieval_param
    from retro_toolkit.checkpoint.gpt_sources import kind_of
    from retro_toolkit.collections.retro.init_from_external import init_from_external
    from retro_toolkit.recipe.model import ModelConfig

    gpt = random_model(22, {**SECTION, "arch": "gpt"})
    ckpt = write_legacy(tmp_path / "gpt", gpt, args={"retro_add_retriever": False})
    assert kind_of(ckpt) == "megatron"
    (tmp_path / "w" / "tokenizer").mkdir(parents=True)
    shutil.copyfile(tokenizer_file, tmp_path / "w" / "tokenizer" / "tokenizer.model")
    retro = random_model(23, SECTION)
    section = {**dataclasses.asdict(ModelConfig()), **SECTION}  # complete, as a recipe's is
    said = []
    new, loaded = init_from_external(ckpt, "megatron", retro, section, tmp_path / "w", said.append)
    assert new and all(is_retrieval_param(n) for n in new) and any(".encoder." in n for n in new)
    assert "carries no tokenizer" in said[0]
    ours = retro.state_dict()
    for name, t in gpt.state_dict().items():
        if isinstance(t, torch.Tensor):
            assert torch.equal(ours[name], t), name

    with pytest.raises(UserError, match=r"another model \(hidden_size: checkpoint 32 vs recipe 64"):
        init_from_external(ckpt, "megatron", retro, {**section, "hidden_size": 64}, tmp_path / "w", said.append)


def test_a_tp2_legacy_gpt_with_grouped_query_attention_imports_with_identical_logits(tmp_path, tokenizer_file):  # noqa: F811
    section = {**SECTION, "arch": "gpt", "num_query_groups": 2}
    model = random_model(24, section)
    want = logits_of(model)
    ckpt = write_legacy(tmp_path / "gqa", model, args={"group_query_attention": True, "num_query_groups": 2,
                                                       "retro_add_retriever": False})
    pkg = nemo.restore(import_checkpoint(ckpt, tokenizer_file, tmp_path / "gqa.nemo", log=lambda s: None))
    assert pkg.section["num_query_groups"] == 2 and pkg.section["arch"] == "gpt"
    assert torch.equal(logits_of(pkg.model), want)


def test_a_gpt_dist_checkpoint_written_by_megatron_core_with_stacked_layers_imports(tmp_path, tokenizer_file):  # noqa: F811
    """megatron-core's own GPTModel (local spec) saved by its own dist_checkpointing, as Megatron-LM's
    torch_dist does: identical layers stacked into one tensor per name."""
    import torch.nn.functional as F
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from retro_toolkit.collections.retro import initialize
    from retro_toolkit.collections.retro.config import cpu_flags

    initialize(1, seed=25)
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                            hidden_dropout=0.0, attention_dropout=0.0, normalization="RMSNorm", gated_linear_unit=True,
                            activation_func=F.silu, add_bias_linear=False, **cpu_flags())
    upstream = GPTModel(cfg, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=VOCAB,
                        max_sequence_length=32, position_embedding_type="rope",
                        share_embeddings_and_output_weights=False).eval()
    g = torch.Generator().manual_seed(25)
    with torch.no_grad():
        for p in upstream.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    (tmp_path / "gpt" / "iter_0000001").mkdir(parents=True)
    (tmp_path / "gpt" / "latest_checkpointed_iteration.txt").write_text("1")
    sd = upstream.sharded_state_dict()
    assert "decoder.layers.self_attention.linear_qkv.weight" in {t.key for t in sd.values() if hasattr(t, "key")}
    sd["args"] = argparse.Namespace(**{**ARGS, "retro_add_retriever": False, "group_query_attention": True,
                                       "num_query_groups": 2, "num_layers": 2, "normalization": "RMSNorm",
                                       "add_bias_linear": False, "rotary_percent": 1.0, "apply_layernorm_1p": False,
                                       "tensor_model_parallel_size": 1})
    dist_checkpointing.save(sd, str(tmp_path / "gpt" / "iter_0000001"))
    tokens = torch.randint(0, VOCAB, (2, 32), generator=g)
    with torch.no_grad():
        want = upstream(tokens, torch.arange(32).expand(2, -1), None)
    out = import_checkpoint(tmp_path / "gpt", tokenizer_file, tmp_path / "gpt.nemo", log=lambda s: None)
    pkg = nemo.restore(out)
    assert pkg.section["num_layers"] == 2 and pkg.section["num_query_groups"] == 2
    with torch.no_grad():
        got = pkg.model(tokens)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_a_tp2_gpt_dist_checkpoint_written_by_megatron_core_imports_with_the_tp1_logits(tmp_path, tokenizer_file):  # noqa: F811
    import importlib.util
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parent / "dist_scripts" / "gpt_dist_tp.py"
    spec = importlib.util.spec_from_file_location("gpt_dist_tp", script)
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    upstream = helper.build(1)
    g = torch.Generator().manual_seed(26)
    with torch.no_grad():
        for p in upstream.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    tokens = torch.randint(0, VOCAB, (2, 64), generator=g)
    with torch.no_grad():
        want = upstream(tokens, torch.arange(64).expand(2, -1), None)
    state = {k: v for k, v in upstream.state_dict().items() if isinstance(v, torch.Tensor)}
    torch.save({"state_dict": state, "tokens": tokens}, tmp_path / "ref.pt")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(tmp_path / "ref.pt"), str(tmp_path / "gpt")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    tp2 = torch.load(tmp_path / "gpt" / "logits.pt", weights_only=True)
    assert float((tp2 - want).abs().max() / want.abs().max()) < 1e-5  # the sharded upstream model itself
    pkg = nemo.restore(import_checkpoint(tmp_path / "gpt", tokenizer_file, tmp_path / "gpt.nemo", log=lambda s: None))
    with torch.no_grad():
        got = pkg.model(tokens)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_rope_scaling_and_qkv_biases_come_from_the_args():
    from retro_toolkit.checkpoint.megatron_args import section_from_args

    llama31 = section_from_args({**ARGS, "use_rope_scaling": True, "rope_scaling_factor": 8.0, "add_qkv_bias": True},
                                Path("ckpt"))
    assert llama31["rope_scaling_factor"] == 8.0 and llama31["add_qkv_bias"] is True
    plain = section_from_args(ARGS, Path("ckpt"))
    assert plain["rope_scaling_factor"] is None and plain["add_qkv_bias"] is False
