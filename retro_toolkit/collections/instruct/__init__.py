"""Instruction data for InstructRetro: readers, the prompt format, answer-only masks, blends."""

from retro_toolkit.collections.instruct.blend import InstructBlend
from retro_toolkit.collections.instruct.format import Context, Conversation, encode_conversation, encode_prompt
from retro_toolkit.collections.instruct.readers import read_dataset

__all__ = ["Context", "Conversation", "InstructBlend", "encode_conversation", "encode_prompt", "read_dataset"]
