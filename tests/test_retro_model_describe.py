"""describe_model: the show-model table (meta-device parameter counts, per part, CCA layers)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from retro_toolkit.collections.retro.describe import describe_model
from retro_toolkit.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

MODELS = Path(__file__).resolve().parents[1] / "yaml" / "model"


def _row(text: str, label: str) -> int:
    m = re.search(rf"^  {re.escape(label)}\s+([\d,]+)\s", text, re.M)
    assert m, (label, text)
    return int(m.group(1).replace(",", ""))


def test_retro_48b_table_is_fast_and_complete():
    describe_model(str(MODELS / "retro_tiny.yaml"), vocab_size=100)  # imports, process group
    t = time.perf_counter()
    text = describe_model(str(MODELS / "retro_48b.yaml"))
    assert time.perf_counter() - t < 5, "48B must be counted on the meta device"
    assert "48,461,840,384" in text
    parts = ["embedding (input)", "decoder self-attention", "decoder MLP", "decoder final norm",
             "chunked cross-attention", "neighbour encoder", "output layer"]
    assert sum(_row(text, p) for p in parts) == _row(text, "total") == 48_461_840_384
    assert _row(text, "GPT twin (no CCA/encoder)") == 42_825_433_088
    assert "CCA layers (1-based, 14): 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39, 42, 45, 48" in text
    assert "published (InstructRetro): 48B" in text and "+1.0%" in text


def test_gpt_and_tiny_pieces():
    text = describe_model(str(MODELS / "gpt_843m.yaml"))
    assert "823,232,512" in text and "CCA layers: none" in text and "neighbour encoder" not in text
    tiny = describe_model(str(MODELS / "retro_tiny.yaml"), vocab_size=8000)
    assert "CCA layers (1-based, 1): 2" in tiny and "published" not in tiny
    assert _row(tiny, "output layer (tied: shared)") == 0


def test_bad_paths_and_missing_vocab_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        describe_model(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [a]\n")
    with pytest.raises(UserError, match="not a model section"):
        describe_model(str(bad))
    with pytest.raises(UserError, match="vocab_size"):
        describe_model(str(MODELS / "retro_tiny.yaml"))
