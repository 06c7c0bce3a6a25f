"""Retro on megatron-core: config, layer specs, RetroModel and its GPT twin."""

from retro_toolkit.collections.retro.config import (
    ModelArgs,
    RetroConfig,
    config_from_model_section,
    default_cca_layers,
)
from retro_toolkit.collections.retro.describe import describe_model
from retro_toolkit.collections.retro.model import (
    GPTTwinModel,
    RetroModel,
    build_model,
    gpt_twin_config,
    parameter_counts,
)
from retro_toolkit.collections.retro.parallel import initialize

__all__ = [
    "GPTTwinModel",
    "ModelArgs",
    "RetroConfig",
    "RetroModel",
    "build_model",
    "config_from_model_section",
    "default_cca_layers",
    "describe_model",
    "gpt_twin_config",
    "initialize",
    "parameter_counts",
]
