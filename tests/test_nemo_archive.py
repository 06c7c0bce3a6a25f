"""The .nemo container: round trip, gzip detection, and malicious archives refused whole."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from retro_toolkit.checkpoint import archive, archive_stream
from retro_toolkit.errors import UserError


def staging(tmp_path: Path) -> Path:
    src = tmp_path / "staging"
    (src / "model_weights").mkdir(parents=True)
    (src / "model_config.yaml").write_text("num_layers: 2\n")
    (src / "model_weights" / "common.pt").write_bytes(b"\x00\x01weights")
    (src / "tokenizer.model").write_bytes(b"spm")
    return src


def test_pack_and_extract_round_trip(tmp_path):
    nemo = archive.pack(staging(tmp_path), tmp_path / "export" / "m.nemo")
    assert sorted(archive.names(nemo)) == ["./model_config.yaml", "./model_weights/common.pt", "./tokenizer.model"]
    with open(nemo, "rb") as f:
        assert f.read(2) != archive_stream.GZIP_MAGIC  # written uncompressed, as NeMo does
    out = archive.extract(nemo, tmp_path / "out")
    assert (out / "model_config.yaml").read_text() == "num_layers: 2\n"
    assert (out / "model_weights" / "common.pt").read_bytes() == b"\x00\x01weights"
    assert not list((tmp_path / "export").glob("*.tmp"))


def test_a_gzipped_archive_is_detected(tmp_path):
    nemo = archive.pack(staging(tmp_path), tmp_path / "m.nemo")
    gz = tmp_path / "m_gz.nemo"
    gz.write_bytes(gzip.compress(nemo.read_bytes()))
    out = archive.extract(gz, tmp_path / "out")
    assert (out / "tokenizer.model").read_bytes() == b"spm"


def _malicious(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w") as tar:
        ok = tarfile.TarInfo("./model_config.yaml")
        ok.size = 3
        tar.addfile(ok, io.BytesIO(b"a: 1"[:3]))
        if member.isfile():
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        else:
            tar.addfile(member)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type = kind
    m.linkname = link
    return m


@pytest.mark.parametrize("member,why", [
    (_member("../../x"), "leaves the destination"),
    (_member("./a/../../x"), "leaves the destination"),
    (_member("/tmp/abs_x"), "leaves the destination"),
    (_member("./link", tarfile.SYMTYPE, "/etc/passwd"), r"symbolic link \(to '/etc/passwd'\)"),
    (_member("./sub/link", tarfile.SYMTYPE, "../../outside"), r"symbolic link \(to '../../outside'\)"),
    (_member("./hard", tarfile.LNKTYPE, "../secret"), r"hard link \(to '../secret'\)"),
    (_member("./dev", tarfile.CHRTYPE), "device or FIFO"),
    (_member("./fifo", tarfile.FIFOTYPE), "device or FIFO"),
])
def test_malicious_members_refuse_the_whole_archive(tmp_path, member, why):
    nemo = _malicious(tmp_path / "bad.nemo", member, b"payload")
    dest = tmp_path / "dest"
    with pytest.raises(UserError, match=why) as e:
        archive.extract(nemo, dest)
    assert repr(member.name) in str(e.value)
    assert not dest.exists()  # checked before anything is written, even the benign member
    assert not (tmp_path / "x").exists() and not Path("/tmp/abs_x").exists()


def test_links_are_refused_even_inside_the_destination(tmp_path):
    nemo = _malicious(tmp_path / "link.nemo", _member("./alias.yaml", tarfile.SYMTYPE, "model_config.yaml"))
    with pytest.raises(UserError, match="'./alias.yaml': it is a symbolic link .*only files and folders"):
        archive.extract(nemo, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unreadable_archives_are_named(tmp_path):
    junk = tmp_path / "junk.nemo"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(UserError, match="junk.nemo is not a readable .nemo"):
        archive.extract(junk, tmp_path / "out")
    with pytest.raises(UserError, match="does not exist"):
        archive.names(tmp_path / "missing.nemo")
