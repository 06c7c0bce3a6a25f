"""torchrun helper for tests/test_pretrain.py (2 processes, gloo): bf16 against fp32, in each rank.

    python -m torch.distributed.run --standalone --nproc_per_node 2 bf16_train.py RECIPE OUT [OVERRIDE...]

Trains the recipe's Retro as pretrain does (20 steps) and as sft does (10), in fp32 and in bf16
with and without the fused weight-gradient GEMM (tests/in_process.py), with the recipe
overrides given (e.g. model.tensor_model_parallel_size=2, pretrain.use_distributed_optimizer=true),
and writes OUT/rank<N>.json for the test to check.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from tests.in_process import compare_bf16_with_fp32  # noqa: E402


def main(recipe: str, out: str, *overrides: str) -> int:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    folder = Path(out) / f"rank{rank}"
    result = {stage: compare_bf16_with_fp32(recipe, folder / stage, stage, iters, overrides)
              for stage, iters in (("pretrain", 20), ("sft", 10))}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
