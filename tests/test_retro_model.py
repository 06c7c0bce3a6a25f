"""RetroModel on megatron-core, on CPU: causality, gate 0, masking, layer placement, input errors."""

from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

from retro_toolkit.collections.retro import (  # noqa: E402
    GPTTwinModel,
    RetroModel,
    build_model,
    config_from_model_section,
    default_cca_layers,
    initialize,
)
from retro_toolkit.collections.retro.chunked_cross_attention import ChunkedCrossAttention  # noqa: E402
from retro_toolkit.errors import UserError  # noqa: E402
from tests.retro_small import SMALL_SECTION  # noqa: E402

M, K, VOCAB = 8, 2, 97
SMALL = {**SMALL_SECTION, "chunk_length": M, "num_neighbors": K}
# Every upstream flavour and position scheme the model can take; the invariants hold for each.
VARIANTS = {
    "legacy": {},
    "core": {"flavor": "megatron_core"},
    "learned_absolute": {"flavor": "megatron_core", "position_embedding_type": "learned_absolute"},
    "encoder_rotary": {"encoder_rotary": True},
}
variants = pytest.mark.parametrize("variant", list(VARIANTS))


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    initialize(1, seed=7)


def make(**over):
    torch.manual_seed(0)
    cfg, args = config_from_model_section({**SMALL, **over}, vocab_size=VOCAB)
    model = build_model(cfg, args)
    # Biases start at zero; make them nonzero so "no output at masked positions" is tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def inputs(b=2, n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (b, n), generator=g)
    nb = torch.randint(0, VOCAB, (b, n // M, K, 2 * M), generator=g)
    nb[0, 1, 1, 5:] = -1  # a short neighbour (document end)
    nb[1, 2, 0] = -1  # a missing neighbour
    return tokens, nb


@torch.no_grad()
@variants
@pytest.mark.parametrize("cca_rotary", [False, True])
def test_neighbours_of_chunk_j_only_reach_positions_from_j_plus_1_times_m_minus_1(cca_rotary, variant):
    model = make(cca_rotary=cca_rotary, **VARIANTS[variant])
    tokens, nb = inputs()
    base = model(tokens, nb)
    assert torch.isfinite(base).all()
    for j in range(nb.shape[1]):
        nb2 = nb.clone()
        nb2[:, j] = torch.randint(0, VOCAB, nb2[:, j].shape)
        out = model(tokens, nb2)
        first = (j + 1) * M - 1
        assert torch.equal(out[:, :first], base[:, :first]), j
        assert not torch.allclose(out[:, first:], base[:, first:]), j


@torch.no_grad()
@variants
def test_token_t_does_not_reach_earlier_positions(variant):
    model = make(**VARIANTS[variant])
    tokens, nb = inputs()
    base = model(tokens, nb)
    for t in (0, M - 1, M, 2 * M + 3, 31):
        tok2 = tokens.clone()
        tok2[:, t] = (tok2[:, t] + 1) % VOCAB
        out = model(tok2, nb)
        assert torch.equal(out[:, :t], base[:, :t]), t
        assert not torch.allclose(out[:, t:], base[:, t:]), t


@torch.no_grad()
@variants
def test_gate_zero_equals_gpt_twin_with_same_decoder_weights(variant):
    model = make(**VARIANTS[variant])
    twin = make(arch="gpt", **VARIANTS[variant])
    assert isinstance(twin, GPTTwinModel)
    missing, unexpected = twin.load_state_dict(model.state_dict(), strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")]
    assert unexpected and all(".cross_attention." in k or ".pre_cross_attn_layernorm." in k for k in unexpected)
    tokens, nb = inputs()
    with_retrieval = model(tokens, nb)
    model.config.retrieval_gate = 0.0
    try:
        gated = model(tokens, nb)
    finally:
        model.config.retrieval_gate = 1.0
    assert torch.equal(gated, twin(tokens))
    assert not torch.allclose(with_retrieval, gated)


@torch.no_grad()
@variants
def test_all_missing_neighbours_equal_gate_zero(variant):
    model = make(**VARIANTS[variant])
    tokens, nb = inputs()
    none = model(tokens, None)
    assert torch.equal(model(tokens, torch.full_like(nb, -1)), none)
    # Per sample, inside a mixed batch too.
    mixed = nb.clone()
    mixed[0] = -1
    out = model(tokens, mixed)
    assert torch.equal(out[0], none[0])
    assert not torch.allclose(out[1], none[1])


@torch.no_grad()
def test_pad_id_is_masked_like_minus_one():
    model = make()
    tokens, nb = inputs()
    model.config.neighbor_pad_id = 3
    try:
        padded = nb.clone()
        padded[0, 1, 1, 5:] = 3
        assert torch.equal(model(tokens, padded), model(tokens, nb))
    finally:
        model.config.neighbor_pad_id = None


@variants
def test_backward_reaches_encoder_and_cca(variant):
    model = make(**VARIANTS[variant])
    model.train()
    tokens, nb = inputs()
    loss = model(tokens, nb, labels=tokens).float().mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    enc = [g for n, g in grads.items() if ".encoder." in n]
    assert enc and all(g is not None and torch.isfinite(g).all() for g in enc)
    assert any(g.abs().sum() > 0 for g in enc)
    if VARIANTS[variant].get("position_embedding_type") == "learned_absolute":
        # Every row of the table (positions 0..31) trains.
        g = grads["embedding.position_embeddings.weight"]
        assert (g.abs().sum(dim=1) > 0).all()


def test_cca_zero_init_starts_as_the_gpt_twin_and_then_learns_to_use_neighbours():
    def plain(**over):
        torch.manual_seed(0)
        cfg, args = config_from_model_section({**SMALL, **over}, vocab_size=VOCAB)
        return build_model(cfg, args)

    model, scaled = plain(cca_zero_init=True), plain()
    proj = [n for n, _ in model.named_parameters() if ".cross_attention.attention.linear_proj." in n]
    assert proj
    sd, ref = dict(model.named_parameters()), dict(scaled.named_parameters())
    for n in sd:  # the same random stream: only the CCA output projection differs
        if n in proj:
            assert sd[n].abs().sum() == 0 and (n.endswith("bias") or ref[n].abs().sum() > 0)
        else:
            assert torch.equal(sd[n], ref[n]), n
    twin = plain(arch="gpt")
    twin.load_state_dict(model.state_dict(), strict=False)
    tokens, nb = inputs()
    model.train()
    twin.train()
    logits = model(tokens, nb)
    assert torch.equal(logits, twin(tokens))

    loss = model(tokens, nb, labels=tokens).float().mean()
    loss.backward()
    assert all(sd[n].grad.abs().sum() > 0 for n in proj if n.endswith("weight"))
    with torch.no_grad():
        for n in proj:
            sd[n] -= 0.5 * sd[n].grad
    model.zero_grad()
    model(tokens, nb, labels=tokens).float().mean().backward()
    enc = [p.grad for n, p in sd.items() if ".encoder." in n]
    assert any(g is not None and g.abs().sum() > 0 for g in enc)
    assert not torch.allclose(model(tokens, nb), twin(tokens))


@pytest.mark.parametrize(
    "layers,expected",
    [
        (12, [6, 9, 12]),
        (24, [9, 12, 15, 18, 21, 24]),
        (32, [9, 12, 15, 18, 21, 24, 27, 30]),
        (48, list(range(9, 49, 3))),
    ],
)
def test_default_cca_layers(layers, expected):
    assert default_cca_layers(layers) == expected
    cfg, _ = config_from_model_section({**SMALL, "num_layers": layers, "cca_layers": None}, vocab_size=VOCAB)
    assert cfg.cca_layers == expected


def test_explicit_cca_layers_below_six_layers():
    model = make(num_layers=4, cca_layers=[2, 4])
    cca = [i + 1 for i, layer in enumerate(model.decoder.layers) if isinstance(layer.cross_attention, ChunkedCrossAttention)]
    assert cca == [2, 4]
    assert model.decoder.layers[1].cross_attention.encoder is not None
    assert model.decoder.layers[3].cross_attention.encoder is None
    assert len(model.decoder.layers[1].cross_attention.encoder.layers) == 2
    with torch.no_grad():
        assert model(*inputs()).shape == (2, 32, VOCAB)
    with pytest.raises(UserError, match="cca_layers"):
        config_from_model_section({**SMALL, "num_layers": 4, "cca_layers": None}, vocab_size=VOCAB)
    with pytest.raises(UserError, match="cca_layers"):
        config_from_model_section({**SMALL, "num_layers": 4, "cca_layers": [5]}, vocab_size=VOCAB)


@torch.no_grad()
def test_bad_inputs_are_user_errors():
    model = make()
    tokens, nb = inputs()
    with pytest.raises(UserError, match="multiple of the chunk length"):
        model(tokens[:, :30], None)
    with pytest.raises(UserError, match="expected"):
        model(tokens, nb[:, :3])
    with pytest.raises(UserError, match="num_neighbors"):
        model(tokens, torch.cat([nb, nb[:, :, :1]], dim=2))
    with pytest.raises(UserError, match="expected"):
        model(tokens, nb[:, :, :, :-1])
    with pytest.raises(UserError, match="neighbor_tokens must be"):
        model(tokens, nb[0])
    with pytest.raises(UserError, match="multiple of model.chunk_length"):
        config_from_model_section({**SMALL, "seq_length": 30}, vocab_size=VOCAB)


def test_pipeline_and_sequence_parallel_are_refused():
    cfg, args = config_from_model_section(SMALL, vocab_size=VOCAB)
    cfg.sequence_parallel = True
    with pytest.raises(UserError, match="sequence_parallel"):
        RetroModel(cfg, args.vocab_size, args.max_sequence_length)


def test_dropout_runs_through_the_cpu_rng_tracker():
    model = make(hidden_dropout=0.1, attention_dropout=0.1, encoder_hidden_dropout=0.1, encoder_attention_dropout=0.1)
    model.train()
    tokens, nb = inputs()
    with torch.no_grad():
        a, b = model(tokens, nb), model(tokens, nb)
    assert torch.isfinite(a).all() and not torch.equal(a, b)


def test_sdpa_matches_megatron_unfused_attention_within_rounding():
    """SDPAttention + our rotary embedding vs megatron-core's DotProductAttention + rope.

    Not bit-identical (SDPA never materialises the scores; the flash kernel sums in another
    order), so compared with a tolerance: logits and every gradient.
    """
    fast = make(rotary_percent=0.5)
    torch.manual_seed(0)
    cfg, args = config_from_model_section({**SMALL, "rotary_percent": 0.5}, vocab_size=VOCAB, core_attention="unfused")
    slow = build_model(cfg, args)
    slow.load_state_dict(fast.state_dict())
    tokens, nb = inputs()
    nb[1, 3] = -1  # a chunk with no neighbours at all (fully masked encoder rows)
    outs = []
    for model in (fast, slow):
        model.train()
        model.zero_grad()
        logits = model(tokens, nb)
        (logits.float() ** 2).mean().backward()
        outs.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (a, ga), (b, gb) = outs
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()
    assert ga.keys() == gb.keys()
    for name in ga:
        assert torch.isfinite(ga[name]).all(), name
        assert torch.allclose(ga[name], gb[name], rtol=1e-3, atol=1e-6), (name, (ga[name] - gb[name]).abs().max())


def test_unknown_core_attention_is_a_user_error():
    with pytest.raises(UserError, match="core_attention"):
        config_from_model_section(SMALL, vocab_size=VOCAB, core_attention="flash")


@pytest.mark.parametrize("cca_rotary", [False, True])
def test_all_missing_neighbours_equal_gate_zero_with_and_without_cca_rotary(cca_rotary):
    model = make(cca_rotary=cca_rotary)
    tokens, nb = inputs()
    with torch.no_grad():
        off = model(tokens, torch.full_like(nb, -1))
        model.config.retrieval_gate = 0.0
        try:
            gate0 = model(tokens, nb)
        finally:
            model.config.retrieval_gate = 1.0
    assert torch.equal(off, gate0)


@pytest.mark.slow
def test_retro_learns_to_copy_its_neighbours_with_cca_rotary():
    """Random tokens, each chunk's neighbour is that chunk plus the next: only retrieval can
    predict them. Misaligned neighbours (off by a chunk or a token) would leave the loss at
    log V; aligned ones are learned within a few hundred steps. (Without the encoder's final
    norm, Megatron-LM's layout, the loss is still 3.11 of log V = 4.16 after these 250 steps.)"""
    import math

    V, m, n = 64, 16, 64
    section = dict(SMALL_SECTION, num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                   seq_length=n, chunk_length=m, num_neighbors=1, cca_layers=[1, 2], cca_rotary=True,
                   encoder_final_norm=True, swiglu=False, apply_layernorm_1p=False, rotary_percent=1.0)
    torch.manual_seed(0)
    cfg, args = config_from_model_section(section, vocab_size=V)
    model = build_model(cfg, args).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(250):
        seq = torch.randint(0, V, (32, n + m + 1), generator=g)
        nb = torch.stack([seq[:, i * m:(i + 2) * m] for i in range(n // m)], 1)[:, :, None, :]
        loss = model(seq[:, :n], nb, labels=seq[:, 1:n + 1])[:, m - 1:].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * math.log(V), loss.item()


CPU_SDPA_BACKENDS = ["MATH", "FLASH_ATTENTION"]  # what torch has on CPU; CUDA adds EFFICIENT_ATTENTION, CUDNN


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", CPU_SDPA_BACKENDS)
def test_fully_masked_rows_do_not_depend_on_the_kernels_convention(monkeypatch, backend, dtype):
    """A missing neighbour masks whole rows of the encoder's self-attention, a chunk with none
    whole rows of CCA. Kernels disagree on such rows (CUDA's memory-efficient SDPA has returned
    NaN; torch's CPU kernels return 0, so only a stand-in shows the dependence here): under each
    CPU backend, a stand-in that returns NaN there leaves logits and gradients exactly those of
    the real kernel, and without the guard it turns the logits NaN."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from retro_toolkit.collections.retro import chunked_cross_attention as layers

    cfg, args = config_from_model_section(SMALL, vocab_size=VOCAB, params_dtype=dtype, bf16=dtype == torch.bfloat16)
    torch.manual_seed(0)
    model = build_model(cfg, args).train()
    assert {p.dtype for p in model.parameters()} == {dtype}
    tokens, nb = inputs()
    nb[0, 2] = -1  # a chunk with no neighbour at all, besides inputs()'s missing one
    full_nb = inputs()[1].clamp(min=0)  # every neighbour present: no row is fully masked

    def run(neighbours):
        model.zero_grad()
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            logits = model(tokens, neighbours, runtime_gather_output=True)
            logits.float().square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want, want_grads = run(nb)
    want_full, _ = run(full_nb)
    sdpa = F.scaled_dot_product_attention
    calls = []

    def nan_on_fully_masked(q, k, v, attn_mask=None, **kw):
        calls.append(attn_mask is not None)
        out = sdpa(q, k, v, attn_mask=attn_mask, **kw)
        if attn_mask is not None:
            full = ~attn_mask.any(dim=-1, keepdim=True)  # torch's mask: True = attend
            out = out.masked_fill(full, float("nan"))
        return out

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", nan_on_fully_masked)
    # Faithful where no row is fully masked: the stand-in is the real kernel.
    assert torch.equal(run(full_nb)[0], want_full) and any(calls)
    got, got_grads = run(nb)
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)
    for name, g in want_grads.items():
        assert torch.isfinite(got_grads[name]).all(), name
        assert torch.equal(got_grads[name], g), name
    # Without the guard the same kernel poisons the logits.
    monkeypatch.setattr(layers, "attendable", lambda mask: mask)
    bad, _ = run(nb)
    assert not torch.isfinite(bad).all()
