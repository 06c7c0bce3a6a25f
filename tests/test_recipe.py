"""Recipe composition, overrides, interpolation and the messages for bad recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from retro_toolkit.errors import UserError
from retro_toolkit.recipe import load_recipe, to_yaml
from tests.conftest import SMOKE


def test_defaults_compose_pieces_and_interpolate():
    r = load_recipe(SMOKE)
    assert r.name == "smoke"
    assert r.model.num_layers == 2 and r.model.chunk_length == 64  # from yaml/model/retro_tiny.yaml
    assert r.data.sources[0].path == "builtin:pydoc"  # from yaml/data/pydoc.yaml
    assert r.tokenizer.vocab_size == 4000  # from yaml/tokenizer/sentencepiece_small.yaml
    assert r.executor.type == "local"
    assert Path(r.workdir).is_absolute() and r.workdir.endswith("runs/smoke")  # ${name} resolved


def test_dotted_overrides_are_typed():
    r = load_recipe(SMOKE, ["tokenizer.vocab_size=1234", "data.split=[0.8,0.1,0.1]", "name=other"])
    assert r.tokenizer.vocab_size == 1234
    assert list(r.data.split) == [0.8, 0.1, 0.1]
    assert r.workdir.endswith("runs/other")  # interpolation sees the override


def test_group_swap_replaces_the_piece():
    r = load_recipe(SMOKE, ["executor=slurm", "executor.account=abc", "executor.nodes=2"])
    assert r.executor.type == "slurm" and r.executor.account == "abc" and r.executor.nodes == 2
    assert r.executor.time == "01:00:00"
    r = load_recipe(SMOKE, ["executor=torchrun", "executor.nproc_per_node=3", "stages=[tokenizer,prepare_corpus]"])
    assert r.executor.nproc_per_node == 3


def test_group_piece_from_a_path(tmp_path):
    piece = tmp_path / "my_model.yaml"
    piece.write_text("arch: gpt\nnum_layers: 3\nseq_length: 128\n")
    r = load_recipe(SMOKE, [f"model={piece}"])
    assert r.model.arch == "gpt" and r.model.num_layers == 3 and r.model.hidden_size == 64


def test_resolved_yaml_round_trips(tmp_path):
    r = load_recipe(SMOKE, ["executor=slurm"])
    f = tmp_path / "recipe.resolved.yaml"
    f.write_text(to_yaml(r))
    assert yaml.safe_load(f.read_text())["executor"]["time"] == "01:00:00"  # stays a string
    assert load_recipe(str(f)) == r


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    (tmp_path / "c.jsonl").write_text('{"text": "hi"}\n')
    monkeypatch.chdir(tmp_path)
    r = load_recipe(SMOKE, ["data.sources=[{path: c.jsonl}]", "workdir=w"])
    assert r.data.sources[0].path == str(tmp_path / "c.jsonl")
    assert r.workdir == str(tmp_path / "w")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["tokenizer.vocab_sise=3"], "unknown recipe key 'tokenizer.vocab_sise'. Did you mean 'tokenizer.vocab_size'?"),
        (["vocab_size=3"], "Did you mean 'tokenizer.vocab_size'?"),
        (["data.sources=[{pathh: x}]"], "unknown recipe key 'data.sources[0].pathh'. Did you mean 'data.sources[0].path'?"),
        (["tokenizer.vocab_size=abc"], "'tokenizer.vocab_size' has the wrong type: got 'abc' (str), expected int"),
        (["data.split=0.5"], "'data.split' has the wrong type: got 0.5 (float), expected a list of float"),
        (["data.split=[0.5,0.5,0.5]"], "'data.split' = [0.5, 0.5, 0.5] must be three non-negative fractions"),
        (["stages=[tokenizr]"], "'stages[0]' = 'tokenizr' is not one of tokenizer,"),
        (["executor=slurmm"], "unknown executor 'slurmm'; did you mean 'slurm'?"),
        (["executor.type=k8s"], "'executor.type' = 'k8s' is not one of local, torchrun, slurm"),
        (["executor.account=abc"], "'executor.account' does not apply to the local executor; it belongs to slurm"),
        (["model.seq_length=100"], "model.seq_length (100) must be a multiple of model.chunk_length (64)"),
        (["name=null"], "'name' has the wrong type: got None"),
        (["novalue"], "override 'novalue' is not of the form key=value"),
        (["workdir=${nope}"], "cannot resolve recipe key 'workdir'"),
        (["pretrain.global_batch_size=10"], "pretrain.global_batch_size (10) must be a multiple of pretrain.micro_batch_size (4)"),
        (["pretrain.lr_decay_style=cosin"], "'pretrain.lr_decay_style' = 'cosin' is not one of cosine, linear, constant. Did you mean 'cosine'?"),
        (["pretrain.lr_warmup_iters=200"], "pretrain.lr_warmup_iters (200) must be below the decay length (200"),
        (["pretrain.freeze_decoder=true"], "set pretrain.init_from to a GPT checkpoint"),
        (["pretrain.retrieval_lr_mult=0"], "recipe key 'pretrain.retrieval_lr_mult' must be positive (got 0"),
        (["pretrain.retrieval_lr_mult=10", "model.arch=gpt"], "pretrain.retrieval_lr_mult needs model.arch retro"),
        (["pretrain.init_from=/no/such/ckpt"], "'pretrain.init_from' points to /no/such/ckpt, which does not exist"),
        (["pretrain.min_lr=1.0"], "pretrain.min_lr (1.0) is above pretrain.lr"),
        (["pretrain.gpt_twin=true", "model.arch=gpt"], "pretrain.gpt_twin needs model.arch retro"),
        (["eval_ppl.splits=[vaild]"], "'eval_ppl.splits[0]' = 'vaild' is not one of train, valid, test. Did you mean 'valid'?"),
        (["pretrain.source_weights=[1.0,2.0]"], "pretrain.source_weights = [1.0, 2.0] must give one non-negative weight per data.sources entry (1)"),
        (["eval_ppl.splits=[]"], "recipe key 'eval_ppl.splits' is empty"),
        (["retrieval.num_candidates=1"], "retrieval.num_candidates (1) must be between model.num_neighbors (2) and "
                                         "retrieval.k_query (100)"),
        (["retrieval.num_candidates=101"], "retrieval.num_candidates (101) must be between"),
        (["pretrain.train_iter=5"], "unknown recipe key 'pretrain.train_iter'. Did you mean 'pretrain.train_iters'?"),
        (["model.num_layers=4", "model.cca_layers=null"], "model.num_layers is 4: Retro's rule puts chunked"),
        (["model.cca_layers=[0,2]"], "model.cca_layers [0, 2] names layers outside 1..2"),
        (["model.cca_layers=[2,2]"], "model.cca_layers [2, 2] names a layer twice"),
        (["model.num_attention_heads=3"], "model.hidden_size (64) must be a multiple of model.num_attention_heads (3)"),
        (["model.swiglu=true", "model.squared_relu=true"], "model.swiglu and model.squared_relu are both true"),
        (["model.num_query_groups=3"], "model.num_attention_heads (4) must be a multiple of model.num_query_groups (3)"),
        (["model.num_query_groups=4", "model.tensor_model_parallel_size=8", "model.num_attention_heads=8"],
         "model.num_query_groups (4) must be a multiple of model.tensor_model_parallel_size (8)"),
        (["model.normalization=LayerNorm1p"], "recipe key 'model.normalization' = 'LayerNorm1p' is not one of LayerNorm, "
                                              "RMSNorm."),
        (["model.tensor_model_parallel_size=8"], "model.num_attention_heads (4) must be a multiple of "
                                                 "model.tensor_model_parallel_size (8)"),
        (["model.flavor=megatron_cor"], "'model.flavor' = 'megatron_cor' is not one of megatron_legacy, "
                                        "megatron_core. Did you mean 'megatron_core'?"),
        (["model.position_embedding_type=alibi"], "'model.position_embedding_type' = 'alibi' is not one of rope, "
                                                  "learned_absolute"),
        (["model.position_embedding_type=learned_absolute", "model.encoder_rotary=true"],
         "model.encoder_rotary needs model.position_embedding_type rope"),
        (["model.position_embedding_type=learned_absolute", "model.seq_length=64"],
         "r = num_retrieved_chunks * chunk_length (128) must not exceed it"),
        (["executor=torchrun", "executor.nproc_per_node=3", "model.tensor_model_parallel_size=2"],
         "stage 'pretrain' starts 3 process(es)"),
        (["executor=torchrun", "executor.stages={pretrain: {nproc_per_node: 4}}"],
         "pretrain.global_batch_size (8) must be a multiple of pretrain.micro_batch_size (4) x data-parallel ranks "
         "(4 = 4 processes / tensor parallel 1) = 16."),
    ],
)
def test_bad_recipe_values_name_the_key(overrides, expected):
    with pytest.raises(UserError) as e:
        load_recipe(SMOKE, overrides)
    assert expected in str(e.value)


def test_missing_recipe_file_suggests_ls():
    with pytest.raises(UserError, match=r"recipe file not found: recipes/smok.yaml.*retro-run ls"):
        load_recipe("recipes/smok.yaml")


def test_bundled_recipe_by_name():
    assert load_recipe("smoke").name == "smoke"


def test_malformed_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("name: x\nstages: [tokenizer\nseed: 1\n")
    with pytest.raises(UserError, match=r"bad.yaml is not valid YAML .* line 3"):
        load_recipe(str(f))


def test_non_mapping_and_required_keys(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_recipe(str(f))
    f = tmp_path / "nostages.yaml"
    f.write_text("name: x\n")
    with pytest.raises(UserError, match="'stages' is required but not set"):
        load_recipe(str(f))


def test_non_utf8_recipe(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8"):
        load_recipe(str(f))


def test_recipe_next_to_its_own_yaml_tree(tmp_path):
    """A copied recipe tree (recipes/ beside yaml/) finds its own pieces first."""
    (tmp_path / "yaml" / "model").mkdir(parents=True)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "yaml" / "model" / "mine.yaml").write_text("num_layers: 7\n")
    (tmp_path / "recipes" / "r.yaml").write_text(
        "defaults:\n  - model: mine\n  - executor: local\nname: r\nstages: [tokenizer]\n"
    )
    r = load_recipe(str(tmp_path / "recipes" / "r.yaml"))
    assert r.model.num_layers == 7 and r.executor.type == "local"


def test_every_unset_key_is_named_at_once():
    with pytest.raises(UserError) as e:
        load_recipe("retro_843m")
    assert ("recipe keys required but not set: executor.account, executor.partition, executor.container_image, "
            "executor.container_mounts[0], paths.data." in str(e.value))


def test_model_stages_keep_their_fingerprint_until_cca_zero_init_is_set():
    from omegaconf import OmegaConf

    from retro_toolkit.runner.manifest import fingerprint

    recipe = load_recipe(SMOKE)
    old = OmegaConf.to_container(recipe)
    del old["model"]["cca_zero_init"]  # a recipe as resolved before the key existed
    for stage in ("pretrain", "sft", "export"):
        assert fingerprint(OmegaConf.create(old), stage) == fingerprint(recipe, stage), stage
        zero = OmegaConf.merge(recipe, {"model": {"cca_zero_init": True}})
        assert fingerprint(zero, stage) != fingerprint(recipe, stage), stage


def test_gpt_pretraining_needs_no_database_and_follows_the_corpus():
    from omegaconf import OmegaConf

    from retro_toolkit.runner.manifest import fingerprint
    from retro_toolkit.runner.plan import make_plan

    stages = ["tokenizer", "prepare_corpus", "pretrain"]
    gpt = load_recipe(SMOKE, ["stages=[tokenizer,prepare_corpus,pretrain]", "model.arch=gpt", "model.cca_layers=[]"])
    assert [s.stage for s in make_plan(gpt)] == stages
    other_split = OmegaConf.merge(gpt, {"data": {"split": [0.8, 0.1, 0.1]}})
    assert fingerprint(other_split, "pretrain") != fingerprint(gpt, "pretrain")  # a new corpus retrains
