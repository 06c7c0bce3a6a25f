"""Tensor parallelism on CPU: two torchrun processes (gloo) reproduce the TP=1 logits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retro_toolkit.collections.retro import build_model, config_from_model_section, initialize
from tests.retro_small import UNTIED_SECTION

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

SCRIPT = Path(__file__).resolve().parent / "dist_scripts" / "retro_tp_equal.py"
SECTION = UNTIED_SECTION
VOCAB = 96


def test_tp2_logits_equal_tp1(tmp_path):
    initialize(1, seed=3)
    cfg, args = config_from_model_section(SECTION, vocab_size=VOCAB)
    model = build_model(cfg, args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (2, 32), generator=g)
    neighbors = torch.randint(0, VOCAB, (2, 4, 2, 16), generator=g)
    neighbors[1, 2, 0, 7:] = -1
    with torch.no_grad():
        logits = model(tokens, neighbors)
        plain = model(tokens, None)
    ref = tmp_path / "ref.pt"
    torch.save(
        {
            "section": SECTION,
            "vocab_size": VOCAB,
            "state_dict": {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
            "tokens": tokens,
            "neighbors": neighbors,
            "logits": logits,
            "logits_no_retrieval": plain,
        },
        ref,
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT), str(ref)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert "max relative difference" in p.stdout
