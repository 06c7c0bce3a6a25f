"""A SentencePiece model as a Hugging Face tokenizer.json (for `export-hf`), computing the same
segmentation: the model's own pieces and scores (unigram) or its merges (BPE), its
normalizer (precompiled character map, extra-whitespace removal, dummy prefix), byte
fallback, and its control symbols as special tokens.

Where two unigram segmentations score exactly the same, SentencePiece and tokenizers may pick
different ones; decoding any ids gives the same text.
"""

from __future__ import annotations

import json
from typing import Any

from retro_toolkit.errors import UserError

SPACE = "\u2581"  # SentencePiece's visible space
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # ModelProto.SentencePiece.Type
UNIGRAM, BPE = 1, 2  # TrainerSpec.ModelType


def _bpe_merges(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces, earliest (highest-scoring) result piece first."""
    rank = {p: i for i, (p, _, t) in enumerate(pieces) if t in (NORMAL, USER_DEFINED)}
    merges = []
    for piece, r in rank.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in rank and right in rank:
                merges.append((r, rank[left], rank[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def tokenizer_json(proto: bytes, name: str) -> tuple[bytes, dict[str, Any]]:
    """(tokenizer.json bytes, the special tokens by role) of a SentencePiece model's bytes."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    m = pb.ModelProto()
    m.ParseFromString(proto)
    ns = m.normalizer_spec
    if m.trainer_spec.treat_whitespace_as_suffix or not ns.escape_whitespaces:
        raise UserError(f"{name}: a SentencePiece model with treat_whitespace_as_suffix or without "
                        "escape_whitespaces has no tokenizer.json counterpart here.")
    # Pieces SentencePiece never picks for text (control, byte, unused) cannot win a segmentation.
    never = min((p.score for p in m.pieces), default=0.0) - 1e4
    pieces = [(p.piece, p.score if p.type in (NORMAL, USER_DEFINED, UNKNOWN) else never, p.type) for p in m.pieces]
    unk_id = next((i for i, (_, _, t) in enumerate(pieces) if t == UNKNOWN), None)
    byte_fallback = bool(m.trainer_spec.byte_fallback)
    if m.trainer_spec.model_type == UNIGRAM:
        model = models.Unigram([(p, s) for p, s, _ in pieces], unk_id, byte_fallback)
    elif m.trainer_spec.model_type == BPE:
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        model = models.BPE(vocab, _bpe_merges(pieces), unk_token=pieces[unk_id][0] if unk_id is not None else None,
                           fuse_unk=True, byte_fallback=byte_fallback)
    else:
        raise UserError(f"{name}: SentencePiece model type {m.trainer_spec.model_type} (word or char) has no "
                        "tokenizer.json counterpart here; export-hf writes unigram and BPE models.")
    steps = []
    if ns.precompiled_charsmap:
        steps.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    # The dummy prefix as a normalizer, not tokenizers' Metaspace: Metaspace skips it where the
    # text already starts with a space, SentencePiece never does. No pre-tokenizer: pieces may
    # span several spaces.
    if ns.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    tk = Tokenizer(model)
    tk.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if ns.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(dec)
    tk.add_special_tokens([AddedToken(p, special=True, normalized=False) for p, _, t in pieces if t == CONTROL])
    tk.add_tokens([AddedToken(p, special=False, normalized=False) for p, _, t in pieces if t == USER_DEFINED])
    ids = {"bos": m.trainer_spec.bos_id, "eos": m.trainer_spec.eos_id, "pad": m.trainer_spec.pad_id,
           "unk": m.trainer_spec.unk_id}
    special = {role: pieces[i][0] for role, i in ids.items() if 0 <= i < len(pieces)}
    return tk.to_str().encode(), special


def tokenizer_config(special: dict[str, str], model_max_length: int) -> bytes:
    """tokenizer_config.json for transformers' AutoTokenizer: no BOS is added (the model never saw one)."""
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
           **{f"{role}_token": tok for role, tok in special.items()}}
    return (json.dumps(cfg, indent=2) + "\n").encode()
