"""Hostile .nemo archives, built by hand: each is refused whole, the destination is left as
it was, nothing appears next to it, and no more than the size budget is ever written."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from retro_toolkit.checkpoint import archive, archive_unpack
from retro_toolkit.checkpoint.nemo import read_config
from retro_toolkit.errors import UserError

CONFIG = b"arch: retro\nweights: model_weights.ckpt\n"


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    m = tarfile.TarInfo(name)
    m.size = len(data)
    return m, data


def _special(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, None]:
    m = tarfile.TarInfo(name)
    m.type, m.linkname = kind, link
    return m, None


def _sym(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    return _special(name, tarfile.SYMTYPE, target)


def _hard(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    return _special(name, tarfile.LNKTYPE, target)


def _tar(path: Path, members: list, mode: str = "w") -> Path:
    """An archive holding a harmless config first, then `members` in order."""
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as tar:
        for m, data in [_file("./model_config.yaml", CONFIG), *members]:
            tar.addfile(m, None if data is None else io.BytesIO(data))
    return path


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _refused(tmp_path: Path, nemo: Path, member: str, why: str, **limits) -> UserError:
    """Extract into tmp_path/dest, which must fail naming `member` and leave no trace."""
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir(exist_ok=True)
    before = _listing(tmp_path)
    with pytest.raises(UserError, match=why) as e:
        archive.extract(nemo, tmp_path / "dest", **limits)
    assert repr(member) in str(e.value) and "sources you trust" in str(e.value)
    assert not (tmp_path / "dest").exists()
    assert _listing(tmp_path) == before and _listing(sentinel) == []
    return e.value


# --- links --------------------------------------------------------------------------------

@pytest.mark.parametrize("members,bad", [
    # Each link alone stays inside; resolved through the others, it leaves.
    ([_sym("./a", "."), _sym("./b", "a/.."), _sym("./c", "b/..")], "./a"),
    ([_sym("./sub/up", ".."), _sym("./sub/l", "up/../sentinel")], "./sub/up"),
    # A link into a folder link whose '..' then leaves; hard links through it, or to it.
    ([_sym("./sub/up", ".."), _sym("./esc", "sub/up/../sentinel")], "./sub/up"),
    ([_sym("./sub/up", ".."), _hard("./h", "sub/up/../sentinel/x")], "./sub/up"),
    ([_file("./f"), _hard("./h", "f"), _sym("./s", "h")], "./h"),
    ([_sym("./a", "b"), _sym("./b", "a")], "./a"),
    ([_sym("./d", "sub"), _file("./d/x")], "./d"),
    ([_sym("./link", "/etc/passwd")], "./link"),
    ([_sym("./link", "../sentinel")], "./link"),
    ([_hard("./h", "../sentinel/x")], "./h"),
    # Even one that stays inside: no package needs a link.
    ([_sym("./alias", "model_config.yaml")], "./alias"),
])
def test_every_link_is_refused_chains_and_hard_links_to_links_included(tmp_path, members, bad):
    _refused(tmp_path, _tar(tmp_path / "bad.nemo", members), bad, "link .*a package holds only files and folders")


@pytest.mark.parametrize("members,bad,why", [
    ([_file("../sentinel/x")], "../sentinel/x", "leaves the destination"),
    ([_file("./a/../../sentinel/x")], "./a/../../sentinel/x", "leaves the destination"),
    ([_file("./a/../b")], "./a/../b", "uses '..'"),
    ([_file("/tmp/retro_abs_x")], "/tmp/retro_abs_x", "leaves the destination"),
    ([_file("./x"), _file("./x")], "./x", "same path"),
    ([_file("."), ], ".", "destination folder itself"),
    ([_special("./dev", tarfile.CHRTYPE)], "./dev", "device or FIFO"),
    ([_special("./blk", tarfile.BLKTYPE)], "./blk", "device or FIFO"),
    ([_special("./fifo", tarfile.FIFOTYPE)], "./fifo", "device or FIFO"),
    ([_special("./odd", b"Z")], "./odd", "neither a file nor a folder"),
])
def test_bad_paths_and_special_members_are_refused(tmp_path, members, bad, why):
    _refused(tmp_path, _tar(tmp_path / "bad.nemo", members), bad, why)
    assert not Path("/tmp/retro_abs_x").exists()


def test_a_nul_byte_in_a_pax_name_is_refused(tmp_path):
    m, data = _file("./x")
    m.pax_headers = {"path": "./x\0y"}
    nemo = tmp_path / "nul.nemo"
    with tarfile.open(nemo, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(m, io.BytesIO(data))
    _refused(tmp_path, nemo, "./x\x00y", "NUL byte")


def test_a_package_tarred_with_its_folders_unpacks(tmp_path):
    src = tmp_path / "staging"
    (src / "model_weights").mkdir(parents=True)
    (src / "model_config.yaml").write_bytes(CONFIG)
    (src / "model_weights" / "w.pt").write_bytes(b"w" * 1000)
    with tarfile.open(tmp_path / "m.nemo", "w") as tar:
        tar.add(src, arcname=".")  # "./", "./model_weights/" and the files, as `tar -C staging .` writes
    out = archive.extract(tmp_path / "m.nemo", tmp_path / "out", max_bytes=2000)
    assert (out / "model_weights" / "w.pt").read_bytes() == b"w" * 1000


def test_read_config_refuses_what_extract_refuses(tmp_path):
    nemo = _tar(tmp_path / "bad.nemo", [_sym("./a", "."), _sym("./b", "a/..")])
    with pytest.raises(UserError, match="'./a'.*symbolic link"):
        read_config(nemo)
    assert read_config(_tar(tmp_path / "ok.nemo", []))["arch"] == "retro"


# --- sizes --------------------------------------------------------------------------------

def _sparse_header(name: str, size: int, stored: int) -> bytes:
    """An old-GNU sparse member header: `stored` bytes of data at offset 0 of a `size`-byte file."""
    info = tarfile.TarInfo(name)
    info.type, info.size = tarfile.GNUTYPE_SPARSE, stored
    buf = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    buf[386:398] = tarfile.itn(0, 12, tarfile.GNU_FORMAT)
    buf[398:410] = tarfile.itn(stored, 12, tarfile.GNU_FORMAT)
    buf[482] = 0  # no extension blocks
    buf[483:495] = tarfile.itn(size, 12, tarfile.GNU_FORMAT)
    buf[148:156] = b" " * 8
    buf[148:155] = b"%06o\0" % tarfile.calc_chksums(bytes(buf))[0]
    return bytes(buf)


@pytest.mark.parametrize("size,limits,budget", [
    (10 * 10**9, {"max_bytes": 1_000_000}, "1,000,000"),
    (2**41, {}, f"{archive.MAX_BYTES:,}"),  # the default budget
])
def test_a_sparse_member_declaring_gigabytes_is_refused_before_writing(tmp_path, size, limits, budget):
    ok = tarfile.TarInfo("./model_config.yaml")
    ok.size = len(CONFIG)
    raw = (ok.tobuf(tarfile.GNU_FORMAT) + CONFIG.ljust(512, b"\0")
           + _sparse_header("./weights.bin", size, 512) + b"\0" * 512 + b"\0" * 1024)
    nemo = tmp_path / "sparse.nemo"
    nemo.write_bytes(raw)
    with tarfile.open(nemo) as tar:  # the stdlib reads it as the sparse file it claims to be
        member = tar.getmember("./weights.bin")
        assert member.isreg() and member.sparse[0] == (0, 512) and member.size == size
    _refused(tmp_path, nemo, "./weights.bin", f"budget of {budget} bytes", **limits)


def test_a_gzip_bomb_is_refused_before_it_is_decompressed(tmp_path):
    nemo = _tar(tmp_path / "bomb.nemo", [_file("./model_weights.ckpt", bytes(50_000_000))], mode="w:gz")
    assert nemo.stat().st_size < 200_000
    _refused(tmp_path, nemo, "./model_weights.ckpt", "budget of 1,000,000 bytes", max_bytes=1_000_000)


def test_declared_sizes_are_summed_over_members(tmp_path):
    nemo = _tar(tmp_path / "many.nemo", [_file(f"./f{i}", bytes(300_000)) for i in range(5)])
    _refused(tmp_path, nemo, "./f3", "budget of 1,000,000 bytes", max_bytes=1_000_000)


def test_bytes_are_counted_while_writing(tmp_path):
    # tarfile hands out exactly each member's declared size, so a well-formed archive cannot
    # get past the declared-size check to this one; it is checked on its own, on a real bomb.
    bomb = gzip.GzipFile(fileobj=io.BytesIO(gzip.compress(bytes(50_000_000))))
    with open(tmp_path / "out", "wb") as out, pytest.raises(archive_unpack._OverBudget):
        archive_unpack._copy(bomb, out, archive_unpack._Budget(3_000_000))
    assert 0 < (tmp_path / "out").stat().st_size <= 3_000_000


def test_a_header_bomb_is_refused(tmp_path):
    # A GNU long name of 2 MB: tarfile reads it in one go, before any member is seen.
    nemo = _tar(tmp_path / "name.nemo", [_file("./" + "n" * 2_000_000)], mode="w:gz")
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    with pytest.raises(UserError, match="more than 1,048,576 bytes in one read"):
        archive.extract(nemo, tmp_path / "dest", max_bytes=1_000_000)
    assert not (tmp_path / "dest").exists() and _listing(sentinel) == []


def test_a_tiny_budget_still_reads_headers(tmp_path):
    out = archive.extract(_tar(tmp_path / "ok.nemo", []), tmp_path / "out", max_bytes=len(CONFIG))
    assert (out / "model_config.yaml").read_bytes() == CONFIG


def test_the_member_count_is_bounded(tmp_path):
    nemo = _tar(tmp_path / "count.nemo", [_file(f"./f{i}") for i in range(10)])
    _refused(tmp_path, nemo, "./f9", "more than 10 members", max_members=10)
    with pytest.raises(UserError, match="more than 10 members"):
        archive.names(nemo, max_members=10)
    assert len(archive.names(nemo, max_members=11)) == 11


# --- the destination is left as it was --------------------------------------------------------

def test_a_refused_archive_leaves_an_existing_destination_unchanged(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="'./a'"):
        archive.extract(_tar(tmp_path / "bad.nemo", [_sym("./a", "."), _sym("./b", "a/..")]), dest)
    assert _listing(dest) == ["keep.txt"] and (dest / "keep.txt").read_text() == "mine"


def test_what_was_written_is_removed_when_a_later_member_fails(tmp_path):
    # Only the write finds this: dest already holds a link, which no member check can see.
    dest = tmp_path / "dest"
    (dest / "real").mkdir(parents=True)
    (dest / "w").symlink_to("real")
    nemo = _tar(tmp_path / "bad.nemo", [_file("./first/a", b"a"), _file("./w/x")])
    with pytest.raises(UserError, match="'./w/x'.*already in") as e:
        archive.extract(nemo, dest)
    assert str(dest / "w") in str(e.value)
    assert _listing(dest) == ["real", "w"] and _listing(dest / "real") == []


def test_an_existing_file_is_never_overwritten(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "model_config.yaml").write_text("mine")
    with pytest.raises(UserError, match="'./model_config.yaml'.*File exists"):
        archive.extract(_tar(tmp_path / "ok.nemo", [_file("./other")]), dest)
    assert _listing(dest) == ["model_config.yaml"] and (dest / "model_config.yaml").read_text() == "mine"


def test_a_failed_write_removes_the_folders_extract_created(tmp_path):
    # A 300-character file name passes every check and fails only when written.
    nemo = _tar(tmp_path / "long.nemo", [_file("./sub/a"), _file("./" + "n" * 300)])
    dest = tmp_path / "new" / "deeper" / "dest"
    with pytest.raises(UserError, match="could not unpack member './nnnn.*left as it was"):
        archive.extract(nemo, dest)
    assert not (tmp_path / "new").exists()
