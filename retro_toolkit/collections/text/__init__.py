"""Text in, tokens out: corpus readers, the decoder tokenizer, token streams.

Shared by retrieval, pretraining, instruction tuning and QA, so it lives apart from them.
"""
