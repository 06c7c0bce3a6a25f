"""megatron-core's parallel state for the model, from one Python process or torchrun.

megatron-core layers need its process groups even at tensor-parallel size 1, so a plain
Python session gets an in-process world of one (no ports), on the device's backend.
"""

from __future__ import annotations

import torch
import torch.distributed as td
from megatron.core import parallel_state, tensor_parallel

from retro_toolkit.core import cpu
from retro_toolkit.core import dist as rdist
from retro_toolkit.errors import UserError


def initialize(tensor_model_parallel_size: int = 1, seed: int = 1234) -> None:
    """Create the process group (if none) and megatron-core's model-parallel groups; seed RNGs.

    Idempotent for the same tensor-parallel size.
    """
    cpu.apply()
    rdist.init(world_of_one=True)
    world = td.get_world_size()
    if world % tensor_model_parallel_size:
        raise UserError(
            f"tensor_model_parallel_size ({tensor_model_parallel_size}) must divide the number of "
            f"processes ({world})."
        )
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() != tensor_model_parallel_size:
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_model_parallel_size,
                                                 distributed_timeout_minutes=rdist.collective_timeout_minutes())
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
