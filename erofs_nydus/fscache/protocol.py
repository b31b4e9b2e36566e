"""Sans-I/O codec for the ``/dev/cachefiles`` on-demand protocol (Linux 5.19+).

Nothing here touches a file descriptor.  :func:`parse_message` turns the bytes of one
``read()`` on the device into a frozen request value; the ``cmd_*`` and :func:`copen`
builders return the exact bytes of one ``write()``; :data:`READ_COMPLETE_IOCTL` is the
request number for ``ioctl(anon_fd, READ_COMPLETE_IOCTL, msg_id)``.

Wire layout (little-endian, ``<linux/cachefiles.h>``)::

    struct cachefiles_msg  { u32 msg_id, opcode, len, object_id; u8 data[]; }      16 bytes
    struct cachefiles_open { u32 volume_key_size, cookie_key_size, fd, flags;
                             u8 data[]; }  /* volume key incl. NUL, then cookie key */
    struct cachefiles_read { u64 off, len; }

``len`` counts the header.  The compiled bindings in ``erofs_nydus._native._cachefiles``
carry the header's own sizes; a test checks they match the constants below.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Final, TypeAlias

from erofs_nydus.errors import ProtocolError

__all__ = [
    "COOKIE_KEY_MAX",
    "HEADER_SIZE",
    "MSG_MAX_SIZE",
    "OPEN_HEADER_SIZE",
    "OP_CLOSE",
    "OP_OPEN",
    "OP_READ",
    "READ_BODY_SIZE",
    "READ_COMPLETE_IOCTL",
    "VOLUME_KEY_MAX",
    "CloseRequest",
    "Message",
    "OpenRequest",
    "ReadRequest",
    "cmd_bind_ondemand",
    "cmd_dir",
    "cmd_restore",
    "cmd_tag",
    "copen",
    "parse_message",
    "volume_name",
]

OP_OPEN: Final = 0
OP_CLOSE: Final = 1
OP_READ: Final = 2

HEADER: Final = struct.Struct("<IIII")  # msg_id, opcode, len, object_id
OPEN_HEADER: Final = struct.Struct("<IIII")  # volume_key_size, cookie_key_size, fd, flags
READ_BODY: Final = struct.Struct("<QQ")  # off, len
HEADER_SIZE: Final = HEADER.size
OPEN_HEADER_SIZE: Final = OPEN_HEADER.size
READ_BODY_SIZE: Final = READ_BODY.size

#: CACHEFILES_MSG_MAX_SIZE: the largest message the kernel sends; read() with at least this.
MSG_MAX_SIZE: Final = 1024
#: Longest volume key string (without its NUL); the kernel limits it to NAME_MAX.
VOLUME_KEY_MAX: Final = 255
#: Longest cookie key fscache accepts (cachefiles itself needs <= 252 to build a file name).
COOKIE_KEY_MAX: Final = 255
#: _IOW(0x98, 1, int): complete a READ; the argument is the msg_id itself, not a pointer.
READ_COMPLETE_IOCTL: Final = (1 << 30) | (4 << 16) | (0x98 << 8) | 1

#: ``write()`` on the device takes at most PAGE_SIZE - 1 bytes per command.
_CMD_MAX: Final = 4095
_U32_MAX: Final = 0xFFFF_FFFF
_INT_MAX: Final = 0x7FFF_FFFF
_LOFF_MAX: Final = (1 << 63) - 1
_MAX_ERRNO: Final = 4095
_EROFS_VOLUME_PREFIX: Final = "erofs,"


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """OPEN: a cookie wants a backing object; answer with :func:`copen`.

    ``fd`` is an anonymous fd the kernel has already installed in the reader's fd table
    (write-only, no O_CLOEXEC).  The daemon owns it from now on, also when it refuses.
    """

    msg_id: int
    object_id: int
    volume_key: str
    cookie_key: bytes
    fd: int
    flags: int


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """READ: fill ``[offset, offset + length)`` of the object, then complete it by ioctl."""

    msg_id: int
    object_id: int
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class CloseRequest:
    """CLOSE: the object is gone; close every fd of ``object_id``.  Never answered."""

    msg_id: int
    object_id: int


Message: TypeAlias = OpenRequest | ReadRequest | CloseRequest


def parse_message(buf: bytes | bytearray | memoryview) -> Message:
    """Decode exactly one message as returned by one ``read()`` of ``/dev/cachefiles``.

    Raises :class:`ProtocolError` for anything the kernel would never send: short or
    over-long buffers, a ``len`` field that disagrees with the buffer, unknown opcodes,
    inconsistent or out-of-range key sizes, a volume key that is not one NUL-terminated
    string, and READ ranges outside ``loff_t``.
    """
    data = bytes(buf)
    if len(data) < HEADER_SIZE:
        raise ProtocolError(f"cachefiles message too short: {len(data)} bytes")
    if len(data) > MSG_MAX_SIZE:
        raise ProtocolError(f"cachefiles message too long: {len(data)} bytes")
    msg_id, opcode, length, object_id = HEADER.unpack_from(data)
    if length != len(data):
        raise ProtocolError(f"cachefiles message len field {length} != {len(data)} bytes read")
    if opcode == OP_OPEN:
        return _parse_open(data, msg_id, object_id)
    if opcode == OP_READ:
        if length != HEADER_SIZE + READ_BODY_SIZE:
            raise ProtocolError(f"cachefiles READ message has length {length}, expected 32")
        offset, size = READ_BODY.unpack_from(data, HEADER_SIZE)
        if size == 0 or offset > _LOFF_MAX or size > _LOFF_MAX - offset:
            raise ProtocolError(f"cachefiles READ range off={offset} len={size} is invalid")
        return ReadRequest(msg_id, object_id, offset, size)
    if opcode == OP_CLOSE:
        if length != HEADER_SIZE:
            raise ProtocolError(f"cachefiles CLOSE message has length {length}, expected 16")
        return CloseRequest(msg_id, object_id)
    raise ProtocolError(f"unknown cachefiles opcode {opcode}")


def _parse_open(data: bytes, msg_id: int, object_id: int) -> OpenRequest:
    if len(data) < HEADER_SIZE + OPEN_HEADER_SIZE:
        raise ProtocolError(f"cachefiles OPEN message too short: {len(data)} bytes")
    vsize, csize, fd, flags = OPEN_HEADER.unpack_from(data, HEADER_SIZE)
    if not 1 <= vsize <= VOLUME_KEY_MAX + 1:
        raise ProtocolError(f"cachefiles OPEN volume_key_size {vsize} out of range")
    if not 1 <= csize <= COOKIE_KEY_MAX:
        raise ProtocolError(f"cachefiles OPEN cookie_key_size {csize} out of range")
    start = HEADER_SIZE + OPEN_HEADER_SIZE
    if len(data) != start + vsize + csize:
        raise ProtocolError(
            f"cachefiles OPEN length {len(data)} != 32 + {vsize} + {csize} (key sizes)"
        )
    if fd > _INT_MAX:
        raise ProtocolError(f"cachefiles OPEN fd {fd} out of range")
    raw_volume = data[start : start + vsize]
    if raw_volume[-1] != 0 or 0 in raw_volume[:-1]:
        raise ProtocolError("cachefiles OPEN volume key is not one NUL-terminated string")
    volume_key = raw_volume[:-1].decode("utf-8", "surrogateescape")
    cookie_key = data[start + vsize :]
    return OpenRequest(msg_id, object_id, volume_key, cookie_key, fd, flags)


def volume_name(volume_key: str) -> str:
    """The EROFS volume's name: ``"erofs,<domain_id or fsid>"`` -> ``"<domain_id or fsid>"``."""
    if not volume_key.startswith(_EROFS_VOLUME_PREFIX) or volume_key == _EROFS_VOLUME_PREFIX:
        raise ProtocolError(f"not an EROFS fscache volume key: {volume_key!r}")
    return volume_key[len(_EROFS_VOLUME_PREFIX) :]


def copen(msg_id: int, size_or_negative_errno: int) -> bytes:
    """Reply to an OPEN: the object's size in bytes (>= 0) or ``-errno`` to fail it.

    Always answer with the real blob size, the same every time: cachefiles discards a
    cached object whose recorded size differs.
    """
    if not 0 <= msg_id <= _U32_MAX:
        raise ProtocolError(f"copen msg_id {msg_id} out of range")
    size = size_or_negative_errno
    if not -_MAX_ERRNO <= size <= _LOFF_MAX:
        raise ProtocolError(f"copen size/errno {size} out of range")
    return f"copen {msg_id},{size}".encode("ascii")


def cmd_dir(path: str | os.PathLike[str]) -> bytes:
    """``dir <path>``: the cache's root directory (must be absolute and on ext4/xfs/btrfs)."""
    text = os.fspath(path)
    if not text.startswith("/"):
        raise ProtocolError(f"cachefiles cache dir must be absolute: {text!r}")
    return _command("dir", text)


def cmd_tag(tag: str) -> bytes:
    """``tag <name>``: optional cache tag (EROFS ignores it)."""
    return _command("tag", tag)


def cmd_bind_ondemand() -> bytes:
    """``bind ondemand``: start the cache in on-demand mode (after ``dir``)."""
    return b"bind ondemand"


def cmd_restore() -> bytes:
    """``restore``: after a daemon restart on an inherited device fd, re-deliver requests."""
    return b"restore"


def _command(verb: str, arg: str) -> bytes:
    if not arg or arg[0].isspace():
        raise ProtocolError(f"cachefiles {verb}: empty argument")
    if "\0" in arg or "\n" in arg:
        raise ProtocolError(f"cachefiles {verb}: argument contains NUL or newline")
    cmd = f"{verb} {arg}".encode("utf-8", "surrogateescape")
    if len(cmd) > _CMD_MAX:
        raise ProtocolError(f"cachefiles {verb}: command longer than {_CMD_MAX} bytes")
    return cmd
