"""A small Hugging Face tokenizer made offline: byte-level BPE trained on CPython's pydoc topics
by the `tokenizers` library and saved by transformers' save_pretrained (tokenizer.json +
tokenizer_config.json), as a real checkpoint's tokenizer folder is."""

from __future__ import annotations

from pathlib import Path

EOS = "<|endoftext|>"


def make_hf_tokenizer(folder: Path, vocab_size: int = 1000, **special: str) -> Path:
    import pydoc_data.topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, "<|pad|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(list(pydoc_data.topics.topics.values()), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tk, **({"eos_token": EOS} | special)).save_pretrained(folder)
    return folder
