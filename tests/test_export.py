""".nemo packages and safetensors: write, restore (also at another tensor-parallel size), refuse bad ones."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from retro_toolkit.checkpoint import archive, nemo
from retro_toolkit.checkpoint.export import export_checkpoint, write_model
from retro_toolkit.checkpoint.safetensors_io import export_safetensors, load_safetensors
from retro_toolkit.collections.retro import build_model, config_from_model_section, initialize
from retro_toolkit.collections.text.sentencepiece_tokenizer import SentencePieceTokenizer as Tokenizer, train_sentencepiece
from retro_toolkit.errors import UserError
from tests.retro_small import UNTIED_SECTION

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")

REPO = Path(__file__).resolve().parents[1]
VOCAB = 96
SECTION = {**UNTIED_SECTION, "vocab_size": VOCAB}
RETRIEVAL = {"chunk_length": 8, "num_neighbors": 2, "num_retrieved_chunks": 2, "embedder": "builtin:all-minilm-l6-v2",
             "index": "Flat"}


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    texts = ["the quick brown fox jumps over the lazy dog", "def main(): return 0 if x else 1",
             "import os, sys; print(sys.argv)"] * 20
    train_sentencepiece(texts, out, VOCAB, "bpe", 1.0, 10000, False, 1)
    return out


def random_model(seed: int, section: dict = SECTION):
    """A model whose every tensor (biases and norms too) is random, so a wrong mapping shows."""
    initialize(1, seed=seed)
    cfg, args = config_from_model_section(section, neighbor_pad_id=0)
    model = build_model(cfg, args).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0) * 0.1)
    return model


def inputs():
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (2, 32), generator=g)
    neighbors = torch.randint(4, VOCAB, (2, 4, 2, 16), generator=g)
    neighbors[1, 2, 0, 7:] = -1
    neighbors[0, 3, 1, 3:] = 0  # the pad id: masked like -1
    return tokens, neighbors


def logits_of(model) -> torch.Tensor:
    tokens, neighbors = inputs()
    with torch.no_grad():
        return model(tokens, neighbors, runtime_gather_output=True)


@pytest.mark.parametrize("weights", ["file", "dist"])
def test_package_holds_the_nemo_layout_and_restores_identical_logits(tmp_path, tokenizer_file, weights):
    model = random_model(7)
    want = logits_of(model)
    out = write_model(model, SECTION, tokenizer_file, tmp_path / "m.nemo", RETRIEVAL, weights)
    names = archive.names(out)
    assert "./model_config.yaml" in names and "./tokenizer.model" in names and "./retrieval.yaml" in names
    if weights == "file":
        assert "./model_weights.ckpt" in names and not any(n.startswith("./model_weights/") for n in names)
    else:
        assert "./model_weights/metadata.json" in names and "./model_weights.ckpt" not in names
    assert not (tmp_path / ".m.nemo.staging").exists()
    pkg = nemo.restore(out)
    assert torch.equal(logits_of(pkg.model), want)
    assert pkg.retrieval == RETRIEVAL
    assert pkg.tokenizer.vocab_size == VOCAB and pkg.tokenizer.encode(["the fox"]) == Tokenizer(tokenizer_file).encode(["the fox"])
    cfg = nemo.read_config(out)
    assert cfg["weights"] == ("model_weights.ckpt" if weights == "file" else "model_weights")
    assert cfg["tokenizer"]["model"] == "nemo:tokenizer.model" and cfg["retrieval"] == "nemo:retrieval.yaml"
    assert not pkg.model.training


def test_a_gzipped_package_restores_too(tmp_path, tokenizer_file):
    import gzip
    import shutil

    model = random_model(8)
    out = write_model(model, SECTION, tokenizer_file, tmp_path / "m.nemo", RETRIEVAL)
    with open(out, "rb") as src, gzip.open(tmp_path / "gz.nemo", "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert (tmp_path / "gz.nemo").read_bytes()[:2] == b"\x1f\x8b"
    assert torch.equal(logits_of(nemo.restore(tmp_path / "gz.nemo").model), logits_of(model))


def test_model_config_loads_with_plain_omegaconf(tmp_path, tokenizer_file):
    from omegaconf import OmegaConf

    out = write_model(random_model(1), SECTION, tokenizer_file, tmp_path / "m.nemo", RETRIEVAL)
    archive.extract(out, tmp_path / "x")
    cfg = OmegaConf.load(tmp_path / "x" / "model_config.yaml")
    assert cfg.num_layers == 3 and cfg.cca_layers == [2, 3] and cfg.swiglu is True and cfg.arch == "retro"
    assert cfg.tokenizer.library == "sentencepiece"
    # Training-only keys stay out: the package describes the function, not how it was trained.
    assert "hidden_dropout" not in cfg and "tensor_model_parallel_size" not in cfg


def test_safetensors_round_trip(tmp_path, tokenizer_file):
    from safetensors import safe_open

    model = random_model(3)
    want = logits_of(model)
    pkg = write_model(model, SECTION, tokenizer_file, tmp_path / "m.nemo", RETRIEVAL)
    folder = export_safetensors(pkg, tmp_path / "st")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert torch.equal(f.get_tensor("embedding.word_embeddings.weight"), model.embedding.word_embeddings.weight)
    assert keys == {k for k in model.state_dict() if not k.endswith("_extra_state")}
    back = load_safetensors(folder)
    assert torch.equal(logits_of(back.model), want)
    assert back.retrieval == RETRIEVAL


def _tamper(src: Path, dst: Path, drop: str | None = None, add: dict[str, bytes] | None = None,
            replace: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(src) as a, tarfile.open(dst, "w") as b:
        for m in a.getmembers():
            if m.name == drop:
                continue
            data = (replace or {}).get(m.name, a.extractfile(m).read())
            m.size = len(data)
            b.addfile(m, io.BytesIO(data))
        for name, data in (add or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            b.addfile(info, io.BytesIO(data))
    return dst


def test_bad_packages_are_refused_naming_the_problem(tmp_path, tokenizer_file):
    model = random_model(2)
    good = write_model(model, SECTION, tokenizer_file, tmp_path / "m.nemo", RETRIEVAL)
    cfg = yaml.safe_load(tarfile.open(good).extractfile("./model_config.yaml").read())

    with pytest.raises(UserError, match="has no model_config.yaml"):
        nemo.restore(_tamper(good, tmp_path / "a.nemo", drop="./model_config.yaml"))
    with pytest.raises(UserError, match="model_weights.ckpt, which is missing"):
        nemo.restore(_tamper(good, tmp_path / "b.nemo", drop="./model_weights.ckpt"))
    with pytest.raises(UserError, match="names tokenizer.model, which the package does not contain"):
        nemo.restore(_tamper(good, tmp_path / "c.nemo", drop="./tokenizer.model"))
    with pytest.raises(UserError, match="not valid YAML"):
        nemo.restore(_tamper(good, tmp_path / "d.nemo", replace={"./model_config.yaml": b"arch: [unclosed"}))
    bigger = yaml.safe_dump({**cfg, "hidden_size": 48}).encode()
    with pytest.raises(UserError, match="another model size"):
        nemo.restore(_tamper(good, tmp_path / "e.nemo", replace={"./model_config.yaml": bigger}))
    # Weights of another model: the missing and the unexpected tensors are listed.
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    state.pop("decoder.final_layernorm.weight")
    state["decoder.layers.9.mlp.linear_fc2.weight"] = torch.zeros(2)
    buf = io.BytesIO()
    torch.save(state, buf)
    with pytest.raises(UserError, match=r"missing 1: decoder\.final_layernorm\.weight; unexpected 1: decoder\.layers\.9"):
        nemo.restore(_tamper(good, tmp_path / "f.nemo", replace={"./model_weights.ckpt": buf.getvalue()}))


def test_a_malicious_package_is_refused_before_anything_is_written(tmp_path, tokenizer_file):
    good = write_model(random_model(2), SECTION, tokenizer_file, tmp_path / "m.nemo", RETRIEVAL)
    for i, name in enumerate(["../../evil.txt", "/tmp/evil_abs.txt"]):
        bad = _tamper(good, tmp_path / f"bad{i}.nemo", add={name: b"x"})
        with pytest.raises(UserError, match="refusing member"):
            nemo.restore(bad)
        with pytest.raises(UserError, match="refusing member"):
            nemo.read_config(bad)
    assert not (tmp_path.parent / "evil.txt").exists() and not (tmp_path.parent.parent / "evil.txt").exists()
    assert not Path("/tmp/evil_abs.txt").exists()


def test_export_needs_one_process_per_weight_file_and_a_known_format(tmp_path, tokenizer_file):
    with pytest.raises(UserError, match="must be 'file' or 'dist'"):
        write_model(random_model(2), SECTION, tokenizer_file, tmp_path / "m.nemo", None, "zip")
    assert not (tmp_path / "m.nemo").exists()


def test_tp2_packages_restore_at_tp1_and_tp1_packages_at_tp2(tmp_path, tokenizer_file):
    """torchrun, 2 processes (gloo): a TP=1 package restored at TP=2, and a TP=2 model's
    package (dist weights) and training checkpoint (exported) restored here at TP=1."""
    model = random_model(7)
    tp1_pkg = write_model(model, SECTION, tokenizer_file, tmp_path / "tp1.nemo", RETRIEVAL)
    torch.save({"tokens": inputs()[0], "neighbors": inputs()[1], "logits": logits_of(model)}, tmp_path / "ref.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    script = REPO / "tests" / "dist_scripts" / "nemo_tp.py"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(tmp_path), str(tp1_pkg), str(tokenizer_file)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert "tp1 package at tp=2: max relative difference" in p.stdout
    assert "tp2 package restored at tp=2: every shard bit-identical" in p.stdout

    tp2 = torch.load(tmp_path / "tp2_logits.pt", weights_only=True)
    from_dist = nemo.restore(tmp_path / "tp2_dist.nemo", tensor_model_parallel_size=1)
    exported = export_checkpoint(tmp_path / "tp2_ckpt", tokenizer_file, tmp_path / "tp2_exported.nemo", RETRIEVAL)
    from_ckpt = nemo.restore(exported, tensor_model_parallel_size=1)
    a, b = from_dist.model.state_dict(), from_ckpt.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith("_extra_state"))
    for pkg in (from_dist, from_ckpt):
        got = logits_of(pkg.model)
        assert ((got - tp2).abs().max() / tp2.abs().max()).item() <= 1e-5
    assert nemo.read_config(exported)["weights"] == "model_weights.ckpt"
