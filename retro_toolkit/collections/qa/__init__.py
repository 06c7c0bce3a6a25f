"""Zero-shot QA evaluation: task readers and prompts, EM/F1, the eval_qa stage."""

from retro_toolkit.collections.qa.metrics import exact_match, f1_score, normalize

__all__ = ["exact_match", "f1_score", "normalize"]
