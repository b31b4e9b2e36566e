"""The lean tar header decoder (builder/tarheader.py) against tarfile's own.

Where the lean path decodes a header, every field must equal tarfile's; every header it
leaves alone goes to tarfile unchanged, so acceptance, errors and messages are
tarfile's.  Checked on real archives (the synthetic tree as PAX, GNU, ustar and v7
tars, GNU tar's own output with long names and sparse files, the debootstrap rootfs)
and on hostile headers: every field of a valid header overwritten with odd numbers,
signs, base-256, bad checksums, non-UTF-8 text, unknown types, truncated and empty
blocks.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import treeutil
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erofs_nydus.builder import BuildOptions, create_image
from erofs_nydus.builder.tarheader import FastTarInfo, NotLean
from erofs_nydus.errors import SourceError

ENC, ERRORS = "utf-8", "surrogateescape"
ATTRS = ("name", "mode", "uid", "gid", "size", "mtime", "chksum", "type", "linkname", "uname",
         "gname", "devmajor", "devminor", "offset", "offset_data", "pax_headers", "sparse")


def _decoded(cls: type[tarfile.TarInfo], buf: bytes) -> tuple[str, Any]:
    """('ok', fields) or ('error', (exception type, message)) of `cls.frombuf(buf)`."""
    try:
        info = cls.frombuf(buf, ENC, ERRORS)
    except Exception as exc:  # compared as they are
        return "error", (type(exc), str(exc))
    return "ok", tuple(getattr(info, a, None) for a in ATTRS)


def _members(cls: type[tarfile.TarInfo], path: Path) -> Any:
    try:
        with tarfile.open(path, mode="r:", encoding=ENC, errors=ERRORS, tarinfo=cls) as tf:
            return [tuple(getattr(m, a, None) for a in ATTRS) for m in tf]
    except Exception as exc:
        return type(exc), str(exc)


def _same_archive(path: Path) -> tuple[int, int]:
    """Same members from both decoders: (members, how many of their main headers the
    lean path decodes itself).  PAX and GNU records in front of a header always go to
    tarfile, and so do headers with base-256 numbers and sparse members.  Read from the
    file (a rootfs tar held in memory would grow the test process by its size)."""
    want = _members(tarfile.TarInfo, path)
    assert isinstance(want, list)
    assert _members(FastTarInfo, path) == want
    lean = 0
    with tarfile.open(path, mode="r:") as tf, open(path, "rb") as raw:
        for m in tf:
            try:
                if not m.issparse():
                    raw.seek(m.offset_data - 512)
                    FastTarInfo.lean_frombuf(raw.read(512), ENC, ERRORS)
                    lean += 1
            except NotLean:
                pass
    return len(want), lean


# -- real archives ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_synthetic_tree_tars_decode_like_tarfile(synthetic_tree: treeutil.Manifest,
                                                 tmp_path: Path, fmt: int) -> None:
    """(Plain ustar cannot hold the tree's long names: ustar headers are covered by GNU
    tar's `ustar`/`posix`/`v7` output below.)"""
    out = tmp_path / "t.tar"
    treeutil.write_tar(synthetic_tree.root, out, format=fmt)
    members, lean = _same_archive(out)
    assert members > 10 and lean > members // 2


@pytest.mark.parametrize("fmt", ["gnu", "oldgnu", "posix", "ustar", "v7"])
def test_gnu_tar_output_decodes_like_tarfile(tmp_path: Path, fmt: str) -> None:
    """GNU tar's formats, with a name needing the ustar prefix or a long-name record, a
    long link target, a sparse file, a FIFO, a hard link and a directory."""
    src = tmp_path / "src"
    deep = src / ("d" * 60) / ("e" * 60)  # 130 bytes: ustar prefix or long name
    deep.mkdir(parents=True)
    (deep / "file").write_bytes(b"x" * 1000)
    with open(src / "sparse", "wb") as f:
        f.seek(1 << 20)
        f.write(b"end")
    os.mkfifo(src / "fifo")
    os.link(src / "sparse", src / "hard")
    os.symlink("t" * 150, src / "longlink")
    (src / "plain").write_text("plain")
    names = ["plain", "sparse", "hard", "fifo", "longlink", "d" * 60]
    if fmt in ("ustar", "v7"):
        names.remove("longlink")  # a 150-byte link target does not fit
    if fmt == "v7":
        names.remove("d" * 60)  # nor a 130-byte name
        names.remove("fifo")  # v7 has no FIFO type
    out = tmp_path / "t.tar"
    sparse = [] if fmt in ("ustar", "v7") else ["--sparse"]  # a GNU / PAX feature
    subprocess.run(["tar", f"--format={fmt}", *sparse, "-cf", str(out), "-C", str(src), *names],
                   check=True, capture_output=True)
    members, lean = _same_archive(out)
    assert members >= len(names) and lean >= members - 1  # all but the sparse file


def test_debootstrap_layer_decodes_like_tarfile(debootstrap_rootfs: Path, tmp_path: Path) -> None:
    out = tmp_path / "rootfs.tar"
    subprocess.run(["tar", "--format=pax", "-cf", str(out), "-C", str(debootstrap_rootfs), "."],
                   check=True, capture_output=True)
    members, lean = _same_archive(out)
    assert members > 1000 and lean == members


# -- hostile headers --------------------------------------------------------------------------

def _valid_header() -> bytes:
    info = tarfile.TarInfo("dir/file")
    info.size, info.mode, info.mtime, info.uid, info.gid = 1234, 0o644, 1_700_000_000, 1000, 100
    info.uname, info.gname = "user", "group"
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _with_checksum(buf: bytearray) -> bytes:
    buf[148:156] = b"        "
    buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf)


NUMBER_FIELDS = [(100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (329, 8), (337, 8)]
ODD_NUMBERS = [b"", b"\0" * 8, b" " * 8, b"0000644\0", b"   644 \0", b"644\0garbage", b"0o644",
               b"+644", b"-644", b"6_44", b"\t644\n", b"\x1c644", b"689", b"\x80" + bytes(7),
               b"\xff" * 8, b"\x80\x00\x00\x00\x00\x01\x00\x00", b"\xc3\xa9", b"0" * 12]
TYPES = [bytes([t]) for t in b"0123456789\0ABDIKLMNSVXgx"]


@pytest.mark.parametrize("odd", ODD_NUMBERS)
@pytest.mark.parametrize("field", NUMBER_FIELDS)
def test_odd_number_fields_decode_like_tarfile(field: tuple[int, int], odd: bytes) -> None:
    off, width = field
    buf = bytearray(_valid_header())
    buf[off:off + width] = odd[:width].ljust(width, b"\0")
    for block in (_with_checksum(buf), bytes(buf)):  # right and stale checksum
        assert _decoded(FastTarInfo, block) == _decoded(tarfile.TarInfo, block)


@pytest.mark.parametrize("type_", TYPES)
@pytest.mark.parametrize("name", [b"dir/file", b"dir/", b"dir//", b"\xff\xfe", b"", b"a" * 100])
def test_types_and_names_decode_like_tarfile(type_: bytes, name: bytes) -> None:
    buf = bytearray(_valid_header())
    buf[156:157] = type_
    buf[0:100] = name.ljust(100, b"\0")
    buf[345:350] = b"pre\xe9x"  # a ustar prefix, not UTF-8
    assert _decoded(FastTarInfo, _with_checksum(buf)) == _decoded(tarfile.TarInfo,
                                                                   _with_checksum(buf))


@pytest.mark.parametrize("block", [b"", b"\0" * 511, b"\0" * 512, b"x" * 512, b"\0" * 513])
def test_empty_truncated_and_garbage_blocks_decode_like_tarfile(block: bytes) -> None:
    assert _decoded(FastTarInfo, block) == _decoded(tarfile.TarInfo, block)


def test_the_lean_path_takes_a_plain_header() -> None:
    info = FastTarInfo.lean_frombuf(_valid_header(), ENC, ERRORS)
    assert (info.name, info.size, info.mode, info.uname) == ("dir/file", 1234, 0o644, "user")
    with pytest.raises(NotLean):
        FastTarInfo.lean_frombuf(bytes(512), ENC, ERRORS)


def test_signed_checksum_goes_to_tarfile() -> None:
    """A header with high bytes summed as signed chars (old Sun tar): tarfile takes it."""
    buf = bytearray(_valid_header())
    buf[0:9] = b"dir/\xe9t\xe9\0\0"
    buf[148:156] = b"        "
    signed = sum(b - 256 if b > 127 else b for b in buf)
    buf[148:156] = b"%06o\0 " % signed
    fast, slow = _decoded(FastTarInfo, bytes(buf)), _decoded(tarfile.TarInfo, bytes(buf))
    assert fast == slow and fast[0] == "ok"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 511), st.binary(min_size=1, max_size=12)),
                min_size=1, max_size=4),
       st.booleans())
def test_mutated_headers_decode_like_tarfile(edits: list[tuple[int, bytes]],
                                             fix_checksum: bool) -> None:
    buf = bytearray(_valid_header())
    for off, data in edits:
        buf[off:off + len(data)] = data[:512 - off]
    block = _with_checksum(buf) if fix_checksum else bytes(buf)
    assert _decoded(FastTarInfo, block) == _decoded(tarfile.TarInfo, block)


def test_bad_first_header_is_a_one_line_source_error(tmp_path: Path) -> None:
    buf = bytearray(_valid_header())
    buf[124:136] = b"12345678901\0"  # size changed, checksum now stale
    with pytest.raises(SourceError) as err:
        create_image(io.BytesIO(bytes(buf) + bytes(1024)), str(tmp_path / "b.boot"),
                     str(tmp_path / "blobs"), BuildOptions())
    assert "\n" not in str(err.value) and "bad checksum" in str(err.value)


@pytest.mark.parametrize("odd", ODD_NUMBERS)
def test_remembered_number_fields_decode_as_the_first_time(odd: bytes,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Number fields are remembered (`_octal_seen`): a field decodes the same the second
    time, one the lean rules refuse is refused every time (never remembered), and at
    most OCTAL_MEMO fields are kept."""
    from erofs_nydus.builder import tarheader

    monkeypatch.setattr(tarheader, "_octal_seen", {})
    for width in (8, 12):
        field = odd[:width].ljust(width, b"\0")
        outcomes = []
        for _ in range(2):
            try:
                outcomes.append(tarheader._octal(field))
            except NotLean:
                outcomes.append("not lean")
        assert outcomes[0] == outcomes[1]
        assert (field in tarheader._octal_seen) == (outcomes[0] != "not lean")
    monkeypatch.setattr(tarheader, "OCTAL_MEMO", 3)
    for n in range(10):
        tarheader._octal(b"%07o\0" % (n + 100))
    assert len(tarheader._octal_seen) == 3 and tarheader._octal(b"0000144\0") == 100
