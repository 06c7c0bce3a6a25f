"""Generation: KV-cached decoding equals full recompute, batching, sampling, input errors."""

from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

from retro_toolkit.collections.generate import FixedNeighbors, SamplingParams, generate_ids, packed, sample  # noqa: E402
from retro_toolkit.collections.retro import build_model, config_from_model_section, initialize  # noqa: E402
from retro_toolkit.collections.retro.inference import RetroInferenceContext  # noqa: E402
from retro_toolkit.errors import UserError  # noqa: E402
from tests.retro_small import SMALL_SECTION  # noqa: E402

VOCAB, M, K, R = 97, 8, 2, 16


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    initialize(1, seed=7)


def make(arch="retro", **over):
    torch.manual_seed(0)
    # A wide init so that greedy decoding of a random model does not settle on one token.
    cfg, args = config_from_model_section({**SMALL_SECTION, "arch": arch, "init_method_std": 1.0, **over},
                                          vocab_size=VOCAB)
    return build_model(cfg, args).eval()


def rand(shape, seed, low=0):
    return torch.randint(low, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("arch,over", [
    ("retro", {}), ("retro", {"cca_rotary": True}), ("gpt", {}),
    ("retro", {"flavor": "megatron_core", "encoder_rotary": True}),
    ("retro", {"position_embedding_type": "learned_absolute"}),
    ("gpt", {"position_embedding_type": "learned_absolute"}),
])
def test_cached_logits_equal_the_full_forward_at_every_position(arch, over):
    # float64: the wide init makes float32 rounding alone reach 1.5e-5 relative, which would
    # hide a real mismatch; in float64 the two paths agree to about 1e-14.
    model = make(arch, **over).double()
    tokens, nb = rand((2, 32), 1), rand((2, 4, K, R), 2)
    nb[0, 1, 0, 5:] = -1
    nb[1, 2] = -1  # a chunk with no neighbours at all
    full = model(tokens, nb if arch == "retro" else None, runtime_gather_output=True)
    ctx = RetroInferenceContext(2, 32, M, K, R)
    ctx.neighbor_tokens.copy_(nb)
    got = [model(tokens[:, :11], inference_context=ctx)[:, -1]]
    ctx.advance(11)
    for t in range(11, 32):
        got.append(model(tokens[:, t : t + 1], inference_context=ctx)[:, -1])
        ctx.advance(1)
    got = torch.stack(got, 1)
    want = full[:, 10:]
    assert got.shape == want.shape == (2, 22, VOCAB)
    assert (got - want).abs().max() <= 1e-10 * want.abs().max()


def test_a_multi_token_piece_after_the_first_is_refused():
    model = make()
    ctx = RetroInferenceContext(1, 32, M, K, R)
    with torch.no_grad():
        model(rand((1, 4), 1), inference_context=ctx)
        ctx.advance(4)
        with pytest.raises(UserError, match="one token at a time"):
            model(rand((1, 2), 1), inference_context=ctx)


def _prompts_and_neighbours():
    prompts = [rand((n,), 10 + n, low=4).tolist() for n in (5, 13, 9)]
    neighbours = [[rand((20,), 30 + 3 * b + j, low=4).tolist() for j in range(c)] for b, c in enumerate((2, 1, 0))]
    return prompts, neighbours


@pytest.mark.parametrize("arch", ["retro", "gpt"])
def test_greedy_with_the_kv_cache_gives_the_tokens_of_full_recompute(arch):
    model = make(arch)
    prompts, neighbours = _prompts_and_neighbours()
    params = SamplingParams(max_new_tokens=27)
    cached = generate_ids(model, prompts, params, FixedNeighbors(neighbours, K, R, 0))
    full = generate_ids(model, prompts, params, FixedNeighbors(neighbours, K, R, 0), use_cache=False)
    assert [g.tokens for g in cached] == [g.tokens for g in full]
    assert all(len(g.tokens) == 27 and g.finish_reason == "length" for g in cached)
    assert all(len(set(g.tokens)) > 3 for g in cached)  # the comparison is not between constant outputs


def test_each_row_of_a_batch_equals_its_own_single_row_generation():
    model = make()
    prompts, neighbours = _prompts_and_neighbours()
    params = SamplingParams(max_new_tokens=20)
    batch = generate_ids(model, prompts, params, FixedNeighbors(neighbours, K, R, 0))
    for p, nb, g in zip(prompts, neighbours, batch):
        assert generate_ids(model, [p], params, FixedNeighbors([nb], K, R, 0))[0].tokens == g.tokens


def test_neighbours_change_what_retro_generates():
    model = make()
    prompts, neighbours = _prompts_and_neighbours()
    params = SamplingParams(max_new_tokens=24)
    with_nb = generate_ids(model, prompts[:1], params, FixedNeighbors(neighbours[:1], K, R, 0))
    without = generate_ids(model, prompts[:1], params, None)
    assert with_nb[0].tokens != without[0].tokens


def test_end_of_document_and_stop_check_end_rows_early():
    model = make()
    prompts, _ = _prompts_and_neighbours()
    params = SamplingParams(max_new_tokens=20)
    free = generate_ids(model, prompts, params)
    eos = free[1].tokens[3]
    outs = generate_ids(model, prompts, params, eos_id=eos)
    assert outs[1].finish_reason == "eos"
    assert outs[1].tokens == free[1].tokens[: free[1].tokens.index(eos)]
    stopped = generate_ids(model, prompts, params, stop_check=lambda new: len(new) == 5)
    assert [g.finish_reason for g in stopped] == ["stop"] * 3 and all(len(g.tokens) == 5 for g in stopped)


def test_sampling_is_seeded_and_its_limits_reduce_to_greedy():
    model = make()
    prompts, neighbours = _prompts_and_neighbours()
    nb = FixedNeighbors(neighbours, K, R, 0)
    hot = SamplingParams(max_new_tokens=16, temperature=1.5, seed=3)
    a, b = generate_ids(model, prompts, hot, nb), generate_ids(model, prompts, hot, nb)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    other = generate_ids(model, prompts, SamplingParams(max_new_tokens=16, temperature=1.5, seed=4), nb)
    assert [g.tokens for g in a] != [g.tokens for g in other]
    greedy = [g.tokens for g in generate_ids(model, prompts, SamplingParams(max_new_tokens=16), nb)]
    for limit in (dict(top_k=1), dict(top_p=1e-6)):
        p = SamplingParams(max_new_tokens=16, temperature=1.5, seed=5, **limit)
        assert [g.tokens for g in generate_ids(model, prompts, p, nb)] == greedy


def test_top_k_and_top_p_only_sample_the_allowed_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    top2 = sample(logits, SamplingParams(temperature=1.0, top_k=2), g)
    assert set(top2.tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # 0.64, 0.24, 0.09, ...: top_p 0.8 keeps the first two
    nucleus = sample(logits, SamplingParams(temperature=1.0, top_p=0.8), g)
    assert set(nucleus.tolist()) == {0, 1}
    share = (nucleus == 0).float().mean().item()
    assert abs(share - probs[0] / probs[:2].sum()) < 0.05


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(stop=[""]), "stop strings"),
])
def test_bad_sampling_settings_are_named(kwargs, match):
    with pytest.raises(UserError, match=match):
        SamplingParams(**kwargs)


def test_training_mode_and_empty_prompts_are_refused():
    model = make()
    with pytest.raises(UserError, match="at least one token"):
        generate_ids(model, [[5], []], SamplingParams())
    model.train()
    with pytest.raises(UserError, match="eval"):
        generate_ids(model, [[5, 6]], SamplingParams())


@pytest.mark.skipif(not packed.available(), reason="MKL packed GEMM needs a CPU torch with MKL")
def test_packed_decode_matmuls_match_megatron_cores_and_are_undone_after():
    model = make()
    one_row_each = rand((3, 1), 1)
    ctx = RetroInferenceContext(3, 8, M, K, R)
    with torch.no_grad():
        plain = model(one_row_each, inference_context=ctx)
        ctx.reset()
        with packed.packed_linears(model, 3):
            fast = model(one_row_each, inference_context=ctx)
            assert len(model._packed_weights) > 0  # the decode step took the packed path
        assert "_forward_impl" not in vars(model.output_layer)  # megatron-core's method is back
    assert (fast - plain).abs().max() <= 1e-5 * plain.abs().max()
