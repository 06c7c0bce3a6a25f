"""Silencing megatron-core's and torch's warnings about the fallbacks this backend relies on."""

from __future__ import annotations

import warnings


def quiet_warnings() -> None:
    """Drop megatron-core's and torch's warnings that say nothing actionable to a user.

    Call before megatron-core is imported (its fallbacks warn at import time).
    """
    for message in (
        "Transformer Engine and Apex are not installed",  # megatron.core.optimizer etc.: torch fallbacks
        "Apex is not installed",  # megatron.core.models.backends: torch norms
        "full scope is deprecated",  # TransformerConfig's cuda_graph_scope default
        r"`load_state_dict` is deprecated",  # dist_checkpointing calls torch.distributed.checkpoint's old name
    ):
        warnings.filterwarnings("ignore", message=message)
