"""RetroModel through megatron-core dist_checkpointing on CPU: save, load, same logits."""

from __future__ import annotations

import pytest
import torch
from megatron.core import dist_checkpointing

from retro_toolkit.collections.retro import build_model, config_from_model_section, initialize
from tests.retro_small import UNTIED_SECTION

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")

VOCAB = 97
SECTION = UNTIED_SECTION


def _model(seed: int, **over):
    torch.manual_seed(seed)
    cfg, args = config_from_model_section({**SECTION, **over}, vocab_size=VOCAB)
    model = build_model(cfg, args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("layernorm.weight"):
                p.normal_(0, 0.1)
    return model


def test_dist_checkpoint_round_trip_gives_identical_logits(tmp_path):
    initialize(1, seed=3)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (2, 32), generator=g)
    neighbors = torch.randint(0, VOCAB, (2, 4, 2, 16), generator=g)
    neighbors[1, 2, 0, 7:] = -1

    saved = _model(0)
    sd = saved.sharded_state_dict()
    # One key per decoder layer (Retro's layers differ), the encoder nested under its CCA layer.
    assert any(k.startswith("decoder.layers.1.cross_attention.encoder.layers.0.cross_attention.") for k in sd)
    assert not any(k.startswith("decoder.layers.2.cross_attention.encoder.") for k in sd)
    (tmp_path / "ckpt").mkdir()
    dist_checkpointing.save(sd, str(tmp_path / "ckpt"))
    with torch.no_grad():
        want = saved(tokens, neighbors)
        want_plain = saved(tokens, None)

    fresh = _model(1)
    with torch.no_grad():
        assert not torch.equal(fresh(tokens, neighbors), want)
    loaded = dist_checkpointing.load(fresh.sharded_state_dict(), str(tmp_path / "ckpt"))
    missing, unexpected = fresh.load_state_dict(loaded, strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")] and not unexpected
    with torch.no_grad():
        assert torch.equal(fresh(tokens, neighbors), want)

    # The GPT twin reads the same checkpoint's decoder (InstructRetro's decoder-only use).
    twin = _model(2, arch="gpt")
    loaded = dist_checkpointing.load(twin.sharded_state_dict(), str(tmp_path / "ckpt"))
    twin.load_state_dict(loaded, strict=False)
    with torch.no_grad():
        assert torch.equal(twin(tokens), want_plain)


def test_sections_stored_before_flavor_and_encoder_rotary_keep_their_behaviour(tmp_path):
    """A checkpoint or package written before model.flavor and model.encoder_rotary existed was a
    megatron_legacy model whose encoder rotated under RoPE: it loads that way, and a recipe at the
    new defaults is refused naming the key to set."""
    from retro_toolkit.checkpoint.nemo import section_of
    from retro_toolkit.collections.retro.checkpointing import check_model_section
    from retro_toolkit.errors import UserError

    old = {k: v for k, v in SECTION.items()}
    assert "encoder_rotary" not in old and "flavor" not in old
    package = section_of({**old, "target": "retro", "weights": "w", "tokenizer": "t"})
    assert package["encoder_rotary"] is True and package["flavor"] == "megatron_legacy"
    learned = section_of({**old, "position_embedding_type": "learned_absolute", "weights": "w"})
    assert learned["encoder_rotary"] is False

    current = {**SECTION, "encoder_rotary": False}
    with pytest.raises(UserError, match=r"encoder_rotary: checkpoint True vs recipe False"):
        check_model_section(tmp_path, old, current, free=set())
    check_model_section(tmp_path, old, {**SECTION, "encoder_rotary": True}, free=set())
    # flavor at its default is left out of new sections; both sides read it as megatron_legacy.
    check_model_section(tmp_path, {**old, "encoder_rotary": False}, current, free=set())
    with pytest.raises(UserError, match=r"flavor: checkpoint 'megatron_legacy' vs recipe 'megatron_core'"):
        check_model_section(tmp_path, {**old, "encoder_rotary": False}, {**current, "flavor": "megatron_core"},
                            free=set())
