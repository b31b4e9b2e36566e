"""A lean decoder for the common tar header, with tarfile's own as the fallback.

`tarfile.TarInfo.frombuf` decodes every 512-byte header field by field through small
Python helpers (`nti`, `nts`, `calc_chksums`, which sums the block twice): about half
of the tar source's per-member cost on a layer of 6.7k members.  `FastTarInfo` is the
`tarinfo` class handed to `tarfile.open`, so tarfile keeps doing everything else (the
iteration, PAX and GNU long-name records, sparse maps, end-of-archive and error
handling); only its `frombuf` is replaced, by one that decodes the plain cases itself:

* the entry types a layer is made of (regular, hard link, symlink, char / block
  device, directory, FIFO, contiguous; not the GNU / PAX extension headers, which
  carry their own records and go to tarfile);
* number fields written in octal digits, optionally padded with spaces and ended by a
  NUL (what every writer emits); a base-256 number, a sign, other whitespace, or
  anything `int()` would also accept goes to tarfile;
* a checksum that matches the unsigned sum (tarfile also accepts the signed one: that
  and every bad checksum go to tarfile, which accepts or rejects it itself).

Anything else is decoded by `tarfile.TarInfo.frombuf` unchanged, so a header is
accepted or rejected exactly as tarfile does, with tarfile's error; where the lean
path accepts a header, every field equals tarfile's (tests/test_tarheader.py compares
both on fixtures and on mutated headers).
"""

from __future__ import annotations

import struct
import tarfile
from typing import Any, Self

BLOCKSIZE = tarfile.BLOCKSIZE
# name mode uid gid size mtime chksum type linkname magic+version uname gname devmajor
# devminor prefix (the ustar layout; tarfile reads the same offsets)
_FIELDS = struct.Struct("100s8s8s8s12s12s8s1s100s8s32s32s8s8s155s")
_LEAN_TYPES = frozenset((tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE,
                         tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE,
                         tarfile.CONTTYPE))
_SPACES_SUM = 8 * 0x20  # the checksum field counts as eight spaces


class NotLean(Exception):
    """This header is for tarfile's own decoder."""


# Number fields repeat from member to member (modes, owners, device numbers, most
# mtimes): their values are remembered, so a layer's ~60k fields (6.7k members of the
# debootstrap layer) mostly cost a dict lookup - 46 -> 35 ms for its headers.  Only
# fields the lean rules accept are kept, and at most OCTAL_MEMO of them.
OCTAL_MEMO = 4096
_octal_seen: dict[bytes, int] = {}


def _octal(field: bytes) -> int:
    """A number field the lean way: octal digits, spaces around them, NUL-terminated."""
    got = _octal_seen.get(field)
    if got is None:
        got = _octal_parse(field)
        if len(_octal_seen) < OCTAL_MEMO:
            _octal_seen[field] = got
    return got


def _octal_parse(field: bytes) -> int:
    end = field.find(b"\0")
    if end >= 0:
        field = field[:end]
    field = field.strip(b" ")
    if not field:
        return 0
    if not field.isdigit():  # sign, base-256, other whitespace, '_', garbage
        raise NotLean
    try:
        return int(field, 8)
    except ValueError:  # an 8 or a 9
        raise NotLean from None


def _text(field: bytes, encoding: str, errors: str) -> str:
    end = field.find(b"\0")
    return (field if end < 0 else field[:end]).decode(encoding, errors)


class FastTarInfo(tarfile.TarInfo):
    """`tarfile.TarInfo` whose `frombuf` decodes the plain headers itself (see above)."""

    __slots__ = ()

    @classmethod
    def frombuf(cls, buf: Any, encoding: str, errors: str) -> Self:
        try:
            return cls.lean_frombuf(buf, encoding, errors)
        except (NotLean, ValueError):  # ValueError: undecodable text, tarfile says how
            return super().frombuf(buf, encoding, errors)

    @classmethod
    def lean_frombuf(cls, buf: Any, encoding: str, errors: str) -> Self:
        """The lean decoder alone: raises `NotLean` (or ValueError) where it stops."""
        if len(buf) != BLOCKSIZE:
            raise NotLean
        (name, mode, uid, gid, size, mtime, chksum, type_, linkname, _magic, uname, gname,
         devmajor, devminor, prefix) = _FIELDS.unpack_from(buf)
        if type_ not in _LEAN_TYPES:
            raise NotLean
        # an all-zero block has checksum 0 != 256: tarfile's EOF handling takes it
        if _octal(chksum) != sum(buf) - sum(chksum) + _SPACES_SUM:
            raise NotLean
        obj = cls()
        obj.name = _text(name, encoding, errors)
        obj.mode = _octal(mode)
        obj.uid = _octal(uid)
        obj.gid = _octal(gid)
        obj.size = _octal(size)
        obj.mtime = _octal(mtime)
        obj.chksum = _octal(chksum)
        obj.type = type_
        obj.linkname = _text(linkname, encoding, errors)
        obj.uname = _text(uname, encoding, errors)
        obj.gname = _text(gname, encoding, errors)
        obj.devmajor = _octal(devmajor)
        obj.devminor = _octal(devminor)
        pre = _text(prefix, encoding, errors)
        if type_ == tarfile.AREGTYPE and obj.name.endswith("/"):
            obj.type = tarfile.DIRTYPE  # old V7: a directory is a file named with a '/'
        if obj.type == tarfile.DIRTYPE:
            obj.name = obj.name.rstrip("/")
        if pre:  # ustar: a long name split into prefix / name (never a GNU type here)
            obj.name = pre + "/" + obj.name
        return obj
