"""The validation walk (`BootstrapReader.tree_passes`) decides exactly as `tree()`.

The daemon validates every bootstrap fully before mount(2); it does so with
`tree_passes`, a walk that builds no tree, and falls back to `tree()` only to name a
problem.  A True where `tree()` finds a problem would weaken that validation, so
thousands of seeded mutants of a varied image (multi-chunk, empty and hard-linked
files, symlinks, a FIFO, xattrs, nested and big directories, two blobs' worth of
devices not needed) are decided both ways and must agree.
"""

from __future__ import annotations

import os
import random
import stat

import pytest

from erofs_nydus.builder import BuildOptions, create_image
from erofs_nydus.layout import erofs as E
from erofs_nydus.rafs.reader import BootstrapReader

CHUNK = 0x1000 * 4


@pytest.fixture(scope="module")
def boot(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    base = tmp_path_factory.mktemp("walk")
    src = base / "src"
    (src / "a" / "b" / "c").mkdir(parents=True)
    (src / "big").mkdir()
    rng = random.Random(7)
    for i in range(6):
        (src / "a" / f"f{i}").write_bytes(rng.randbytes(CHUNK * i + 100 * i))
    (src / "a" / "b" / "c" / "empty").write_bytes(b"")
    (src / "a" / "b" / "exact").write_bytes(rng.randbytes(2 * CHUNK))
    os.link(src / "a" / "f3", src / "a" / "b" / "hard")
    os.symlink("../f1", src / "a" / "b" / "rel")
    os.symlink("/" + "x" * 300, src / "longlink")
    os.mkfifo(src / "fifo")
    for i in range(300):  # a directory over several blocks
        (src / "big" / f"name-{i:04d}").write_bytes(bytes([i % 256]) * (i % 7))
    try:
        os.setxattr(src / "a" / "f2", "user.k", b"v" * 40)
        os.setxattr(src / "a" / "b", "user.d", b"1")
    except OSError:
        pass  # a filesystem without user xattrs: the rest still varies enough
    create_image(str(src), str(base / "img.boot"), str(base / "blobs"),
                 BuildOptions(chunk_size=CHUNK))
    return (base / "img.boot").read_bytes()


def _tree_ok(data: bytes) -> bool | None:
    """`tree()`'s verdict (None: the reader refuses the bytes before any walk)."""
    try:
        r = BootstrapReader(data)
    except Exception:
        return None
    before = r.problems(walk=False)
    try:
        r.tree()
    except Exception:
        return False
    return r.problems(walk=False) == before


def _targets(data: bytes) -> list[tuple[int, int]]:
    """(offset, size) of fields worth breaking: every inode's fields, its chunk index
    array, and the directory blocks."""
    r = BootstrapReader(data)
    out: list[tuple[int, int]] = []
    stack = [r.sb.root_nid]
    seen = set(stack)
    while stack:
        ri = r.inode(stack.pop())
        out += [(ri.offset + k, w) for k in range(0, ri.isize, 2) for w in (1, 2, 4)]
        if stat.S_ISREG(ri.mode) and ri.size:
            start = (ri.offset + ri.isize + E.xattr_ibody_size(ri.xattr_icount) + 7) & ~7
            n = (ri.size + r.image.chunk_size - 1) // r.image.chunk_size
            out += [(start + 8 * i + k, 2) for i in range(n) for k in (2, 4, 6)]
        if stat.S_ISDIR(ri.mode):  # the dirents of each block: nid, nameoff, file type
            tail = 0 if ri.datalayout == E.DATALAYOUT_FLAT_PLAIN else ri.size % 4096
            parts = [ri.i_u * 4096 + b for b in range(0, ri.size - tail, 4096)]
            if tail:
                parts.append(ri.offset + ri.isize + E.xattr_ibody_size(ri.xattr_icount))
            out += [(p + k, 2) for p in parts for k in range(0, 120, 2)]
            for _name, nid, _t in r.dirents(ri):
                if nid not in seen:
                    seen.add(nid)
                    stack.append(nid)
    return out


def test_pristine_image_passes(boot: bytes) -> None:
    assert BootstrapReader(boot).tree_passes() and _tree_ok(boot)


def test_mutants_decided_as_tree_decides(boot: bytes) -> None:
    rng = random.Random(2024)
    targets = _targets(boot)
    values = [0, 1, 2, 3, 4, 5, 8, 0x20, 0x24, 0x7F, 0xFF, 0x1000, 0x8000, 0xFFFF,
              0x10000, 0x7FFFFFFF, 0xFFFFFFFF]
    verdicts = {True: 0, False: 0}
    for n in range(2000):
        out = bytearray(boot)
        for _ in range(rng.choice((1, 1, 2))):
            off, width = rng.choice(targets)
            if rng.random() < 0.5:
                v = rng.choice(values) & ((1 << (8 * width)) - 1)
            else:
                v = int.from_bytes(out[off:off + width], "little") ^ (1 << rng.randrange(
                    8 * width))
            out[off:off + width] = v.to_bytes(width, "little")
        data = bytes(out)
        want = _tree_ok(data)
        if want is None:
            continue
        got = BootstrapReader(data).tree_passes()
        assert got == want, f"mutant {n}: tree_passes {got}, tree() {want}"
        verdicts[want] += 1
    assert verdicts[True] > 100 and verdicts[False] > 500, verdicts  # both sides exercised
