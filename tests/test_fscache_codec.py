"""The /dev/cachefiles on-demand codec: table tests, fuzzing, and the header's real ABI."""

from __future__ import annotations

import contextlib
import errno
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from erofs_nydus.errors import ProtocolError
from erofs_nydus.fscache import protocol as p

# ---- test-only encoder (what the kernel would write) -------------------------------------


def enc_open(
    msg_id: int, object_id: int, volume_key: bytes, cookie_key: bytes, fd: int, flags: int = 0
) -> bytes:
    vkey = volume_key + b"\0"
    length = 32 + len(vkey) + len(cookie_key)
    return (
        struct.pack("<IIII", msg_id, p.OP_OPEN, length, object_id)
        + struct.pack("<IIII", len(vkey), len(cookie_key), fd, flags)
        + vkey
        + cookie_key
    )


def enc_read(msg_id: int, object_id: int, off: int, length: int) -> bytes:
    return struct.pack("<IIIIQQ", msg_id, p.OP_READ, 32, object_id, off, length)


def enc_close(msg_id: int, object_id: int) -> bytes:
    return struct.pack("<IIII", msg_id, p.OP_CLOSE, 16, object_id)


def encode(msg: p.Message) -> bytes:
    if isinstance(msg, p.OpenRequest):
        vkey = msg.volume_key.encode("utf-8", "surrogateescape")
        return enc_open(msg.msg_id, msg.object_id, vkey, msg.cookie_key, msg.fd, msg.flags)
    if isinstance(msg, p.ReadRequest):
        return enc_read(msg.msg_id, msg.object_id, msg.offset, msg.length)
    return enc_close(msg.msg_id, msg.object_id)


# ---- table tests -------------------------------------------------------------------------


def test_parse_open_as_erofs_sends_it() -> None:
    msg = p.parse_message(enc_open(7, 3, b"erofs,testfs", b"testfs", 5))
    assert msg == p.OpenRequest(7, 3, "erofs,testfs", b"testfs", 5, 0)
    assert p.volume_name(msg.volume_key) == "testfs"


def test_parse_read_and_close() -> None:
    assert p.parse_message(enc_read(9, 2, 8192, 4096)) == p.ReadRequest(9, 2, 8192, 4096)
    assert p.parse_message(enc_read(9, 2, 8192, 4096)).end == 12288  # type: ignore[union-attr]
    assert p.parse_message(enc_close(10, 2)) == p.CloseRequest(10, 2)


def test_parse_accepts_bytearray_and_memoryview() -> None:
    raw = enc_close(1, 1)
    assert p.parse_message(bytearray(raw)) == p.parse_message(memoryview(raw))


def _set_len(raw: bytes, length: int) -> bytes:
    return raw[:8] + struct.pack("<I", length) + raw[12:]


GOOD_OPEN = enc_open(1, 1, b"erofs,x", b"blob", 4)

BAD = {
    "empty": b"",
    "short header": b"\0" * 15,
    "len too big": _set_len(enc_close(1, 1), 17),
    "len too small": _set_len(enc_close(1, 1), 15),
    "trailing byte": enc_close(1, 1) + b"\0",
    "unknown opcode": struct.pack("<IIII", 1, 3, 16, 1),
    "close with payload": _set_len(enc_close(1, 1) + b"\0" * 4, 20),
    "read truncated": _set_len(enc_read(1, 1, 0, 4096)[:24], 24),
    "read zero length": enc_read(1, 1, 0, 0),
    "read offset beyond loff_t": enc_read(1, 1, 1 << 63, 4096),
    "read end beyond loff_t": enc_read(1, 1, (1 << 63) - 4096, 8192),
    "open without payload header": _set_len(GOOD_OPEN[:20], 20),
    "open truncated keys": _set_len(GOOD_OPEN[:-1], len(GOOD_OPEN) - 1),
    "open extra byte": _set_len(GOOD_OPEN + b"x", len(GOOD_OPEN) + 1),
    "open zero volume key size": GOOD_OPEN[:16] + struct.pack("<I", 0) + GOOD_OPEN[20:],
    "open zero cookie key size": enc_open(1, 1, b"erofs,x", b"", 4),
    "open cookie key too long": enc_open(1, 1, b"e", b"k" * 256, 4),
    "open volume key too long": enc_open(1, 1, b"v" * 256, b"k", 4),
    "open volume key without NUL": enc_open(1, 1, b"erofs,x", b"blob", 4).replace(
        b"erofs,x\0blob", b"erofs,xyblob"
    ),
    "open volume key with inner NUL": enc_open(1, 1, b"erofs\0x", b"blob", 4),
    "open negative fd": enc_open(1, 1, b"erofs,x", b"blob", 0xFFFF_FFFF),
    "oversized message": enc_open(1, 1, b"v" * 255, b"k" * 255, 4) + b"\0" * 600,
}


@pytest.mark.parametrize("raw", BAD.values(), ids=BAD.keys())
def test_parse_rejects(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        p.parse_message(raw)


def test_largest_open_fits_the_kernel_buffer() -> None:
    raw = enc_open(1, 1, b"v" * p.VOLUME_KEY_MAX, b"k" * p.COOKIE_KEY_MAX, 4)
    assert len(raw) <= p.MSG_MAX_SIZE
    assert isinstance(p.parse_message(raw), p.OpenRequest)


def test_volume_name() -> None:
    assert p.volume_name("erofs,domain1") == "domain1"
    for bad in ("erofs,", "nfs,x", "", "erofs"):
        with pytest.raises(ProtocolError):
            p.volume_name(bad)


def test_replies() -> None:
    assert p.copen(7, 3 << 20) == b"copen 7,3145728"
    assert p.copen(0, 0) == b"copen 0,0"
    assert p.copen(4294967295, -5) == b"copen 4294967295,-5"
    assert p.copen(8, -4095) == b"copen 8,-4095"
    assert p.cmd_dir("/var/cache/x") == b"dir /var/cache/x"
    assert p.cmd_tag("mycache") == b"tag mycache"
    assert p.cmd_bind_ondemand() == b"bind ondemand"
    assert p.cmd_restore() == b"restore"
    assert p.READ_COMPLETE_IOCTL == 0x40049801


@pytest.mark.parametrize(("msg_id", "size"), [(-1, 0), (1 << 32, 0), (1, -4096), (1, 1 << 63)])
def test_copen_rejects_out_of_range(msg_id: int, size: int) -> None:
    with pytest.raises(ProtocolError):
        p.copen(msg_id, size)


@pytest.mark.parametrize("path", ["relative/dir", "/a\nb", "/a\0b", "/" + "x" * 4096])
def test_cmd_dir_rejects(path: str) -> None:
    with pytest.raises(ProtocolError):
        p.cmd_dir(path)


# ---- property tests ----------------------------------------------------------------------

u32 = st.integers(0, 0xFFFF_FFFF)
key_text = st.text(
    st.characters(min_codepoint=1, max_codepoint=0x7F), min_size=1, max_size=p.VOLUME_KEY_MAX
)
messages: st.SearchStrategy[p.Message] = st.one_of(
    st.builds(
        p.OpenRequest,
        msg_id=u32,
        object_id=u32,
        volume_key=key_text,
        cookie_key=st.binary(min_size=1, max_size=p.COOKIE_KEY_MAX),
        fd=st.integers(0, 0x7FFF_FFFF),
        flags=u32,
    ),
    st.integers(0, (1 << 63) - 2).flatmap(
        lambda off: st.builds(
            p.ReadRequest,
            msg_id=u32,
            object_id=u32,
            offset=st.just(off),
            length=st.integers(1, (1 << 63) - 1 - off),
        )
    ),
    st.builds(p.CloseRequest, msg_id=u32, object_id=u32),
)


@given(messages)
def test_round_trip(msg: p.Message) -> None:
    assert p.parse_message(encode(msg)) == msg


@given(st.binary(max_size=1100))
def test_garbage_raises_only_protocol_error(raw: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        p.parse_message(raw)


@given(messages, st.data())
def test_mutated_messages_raise_only_protocol_error(msg: p.Message, data: st.DataObject) -> None:
    raw = bytearray(encode(msg))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    with contextlib.suppress(ProtocolError):
        p.parse_message(bytes(raw[:cut]))


@given(u32, st.integers(-4095, (1 << 63) - 1))
def test_copen_is_what_the_kernel_parses(msg_id: int, size: int) -> None:
    verb, _, rest = p.copen(msg_id, size).decode("ascii").partition(" ")
    ids, _, sizes = rest.partition(",")
    assert verb == "copen"
    assert (int(ids), int(sizes)) == (msg_id, size)
    assert not ids.startswith("0") or ids == "0"  # kstrtoul(.., 0): leading 0 means octal


# ---- the real header, via the compiled cffi module ---------------------------------------


def test_cffi_layout_matches_codec() -> None:
    cf = pytest.importorskip("erofs_nydus._native._cachefiles")
    ffi, lib = cf.ffi, cf.lib
    assert ffi.sizeof("struct cachefiles_msg") == p.HEADER_SIZE
    assert lib.ENS_MSG_DATA_OFFSET == p.HEADER_SIZE
    assert [
        ffi.offsetof("struct cachefiles_msg", f) for f in ("msg_id", "opcode", "len", "object_id")
    ] == [0, 4, 8, 12]
    assert ffi.sizeof("struct cachefiles_open") == p.OPEN_HEADER_SIZE
    assert lib.ENS_OPEN_DATA_OFFSET == p.OPEN_HEADER_SIZE
    assert [
        ffi.offsetof("struct cachefiles_open", f)
        for f in ("volume_key_size", "cookie_key_size", "fd", "flags")
    ] == [0, 4, 8, 12]
    assert ffi.sizeof("struct cachefiles_read") == p.READ_BODY_SIZE
    assert [ffi.offsetof("struct cachefiles_read", f) for f in ("off", "len")] == [0, 8]
    assert (lib.CACHEFILES_OP_OPEN, lib.CACHEFILES_OP_CLOSE, lib.CACHEFILES_OP_READ) == (
        p.OP_OPEN,
        p.OP_CLOSE,
        p.OP_READ,
    )
    assert lib.CACHEFILES_IOC_READ_COMPLETE == p.READ_COMPLETE_IOCTL
    assert lib.CACHEFILES_MSG_MAX_SIZE == p.MSG_MAX_SIZE


# ---- the codec against the real kernel (QEMU fscache VM) ---------------------------------


@pytest.mark.vm
@pytest.mark.timeout(1800)
def test_error_replies_in_vm(tmp_path: Path) -> None:
    """A negative copen fails the mount; a READ completed without data fails the read."""
    vs = pytest.importorskip("vm_support")
    if (reason := vs.vm_skip_reason()) is not None:
        pytest.skip(reason)
    if shutil.which("mkfs.erofs") is None:
        pytest.skip("mkfs.erofs missing (apt-get install erofs-utils)")
    a = vs.make_chunked_image(tmp_path)
    res = vs.run_python_in_vm(
        "import os, vm_support as v\n"
        "v.emit_result(v.guest_fscache_error_paths(os.environ['SCRATCH'] + '/fscache', "
        f"{a['fsid']!r}, {a['image']!r}, {a['blob_tag']!r}, {a['blob']!r}))\n",
        timeout=600,
    )
    assert res.returncode == 0, res.stdout
    r = vs.vm_result(res.stdout)
    assert r["errors"] == []
    assert r["refused_mount_rc"] != 0
    assert r["opens_after_refusal"] == 1
    assert r["listing"] == ["big.bin", "empty", "sub"]
    assert r["read_error"] == errno.EIO
    assert r["counts"]["read"] >= 1
