"""Bootstrap fuzzing through the daemon path (issue 11 item 2, invariant (b)).

Run in a child process with resource limits (see test_integrity.py):
    python -c "import fuzz_support; fuzz_support.main()" BOOT BLOB_DIR WORK SEED COUNT

Each mutant of BOOT is registered with an in-process `ImageTable` (the daemon's own
validation and cache files).  Refused: it must be an ErofsNydusError (and, for a
sample, `erofs-nydus check` must say so in one line per problem, no traceback).
Accepted: every chunk of every regular file is filled and read back from the cache
file; the bytes must be those of the original image's chunk with that digest, or
the fill must raise an ErofsNydusError.  Anything else is a violation.  Prints one
JSON summary line; accepted mutants are kept in WORK/accepted-N.boot.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys
from typing import Any

from erofs_nydus.daemon.images import ImageTable
from erofs_nydus.errors import ErofsNydusError
from erofs_nydus.layout import erofs as E
from erofs_nydus.layout import parse
from erofs_nydus.layout import rafs as R
from erofs_nydus.rafs.backend import LocalDirBackend
from erofs_nydus.rafs.check import read_chunk
from erofs_nydus.rafs.reader import BootstrapReader

CLI = [sys.executable, "-c", "from erofs_nydus.cli import run; run()"]
INTERESTING = [0, 1, 2, 7, 0xFF, 0x1000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF,
               1 << 32, 1 << 40, 1 << 63, (1 << 64) - 1]


def regions(boot: bytes) -> list[tuple[int, int]]:
    """Byte ranges worth mutating: superblocks, device slots, blob and chunk tables,
    inode chunk-index arrays, the metadata area."""
    ext = parse(R.SuperBlockExt, boot, R.EXT_SUPERBLOCK_OFFSET, "ext")
    r = BootstrapReader(boot)
    out = [(1024, 1152), (1152, 1408), (1408, 1408 + 128 * r.sb.extra_devices),
           (int(ext.s_blob_table_offset), int(ext.s_blob_table_offset) + R.BLOB_ENTRY_SIZE),
           (int(ext.s_chunk_table_offset),
            int(ext.s_chunk_table_offset) + int(ext.s_chunk_table_size)),
           (r.meta_base, min(len(boot), int(ext.s_chunk_table_offset) or len(boot)))]
    return [(a, b) for a, b in out if b > a]


def index_arrays(boot: bytes) -> list[tuple[int, int]]:
    """(offset, count) of every regular file's chunk-index array."""
    r = BootstrapReader(boot)
    out = []
    for _name, nid, _t in r.dirents(r.inode(r.sb.root_nid)):
        ri = r.inode(nid)
        if not stat.S_ISREG(ri.mode) or not ri.size:
            continue
        start = (ri.offset + ri.isize + E.xattr_ibody_size(ri.xattr_icount) + 7) & ~7
        out.append((start, (ri.size + r.image.chunk_size - 1) // r.image.chunk_size))
    return out


def mutate(boot: bytes, rng: random.Random, regs: list[tuple[int, int]],
           arrays: list[tuple[int, int]], ct: tuple[int, int]) -> bytes:
    out = bytearray(boot)
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        if kind < 0.25:  # any byte
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif kind < 0.55:  # a field of a structure set to an interesting value
            a, b = rng.choice(regs)
            size = rng.choice((2, 4, 8))
            pos = a + (rng.randrange(max(1, (b - a) // size)) * size)
            if pos + size <= len(out):
                v = rng.choice(INTERESTING) & ((1 << (8 * size)) - 1)
                out[pos:pos + size] = v.to_bytes(size, "little")
        elif kind < 0.8:  # a chunk record field copied from another record
            off, n = ct
            if n >= 2:
                i, j = rng.sample(range(n), 2)
                f_off, f_len = rng.choice([(0, 32), (32, 4), (40, 8), (48, 8), (56, 8), (72, 4)])
                src = off + j * R.CHUNK_INFO_SIZE + f_off
                dst = off + i * R.CHUNK_INFO_SIZE + f_off
                out[dst:dst + f_len] = out[src:src + f_len]
        else:  # a file's chunk index pointed at another chunk's block
            (a_off, a_n), (b_off, b_n) = rng.choice(arrays), rng.choice(arrays)
            dst = a_off + 8 * rng.randrange(a_n)
            src = b_off + 8 * rng.randrange(b_n)
            out[dst + 2:dst + 8] = out[src + 2:src + 8]
    return bytes(out)


def known_chunks(boot: bytes, blob_dir: str) -> dict[bytes, bytes]:
    """Digest -> plain bytes of every chunk of the original image."""
    r = BootstrapReader(boot)
    backend = LocalDirBackend(blob_dir)
    out = {}
    for blob in r.image.blobs:
        for c in r.image.chunks_for_blob(blob.blob_index):
            out[c.digest] = read_chunk(backend, blob.blob_id, c)
    return out


def read_all(boot: bytes, table: ImageTable, known: dict[bytes, bytes]) -> tuple[int, int,
                                                                               list[str]]:
    """Fill and read back every chunk of every regular file: (chunks ok, errors, violations)."""
    r = BootstrapReader(boot)
    ok = errors = 0
    bad: list[str] = []
    stack = [r.tree()]
    while stack:
        node = stack.pop()
        if node.children is not None:
            stack.extend(node.children.values())
            continue
        for c in node.inode.chunks or []:
            srv = table.blobs[r.image.blobs[c.blob_index].blob_id]
            try:
                srv.fill(c.uncompressed_offset, c.uncompressed_size)
            except ErofsNydusError:
                errors += 1
                continue
            got = os.pread(srv.cache.fd, c.uncompressed_size, c.uncompressed_offset)
            if got != known.get(c.digest):
                bad.append(f"chunk {c.index} of {node.name!r}: served bytes that are not the "
                           "image's")
            else:
                ok += 1
    return ok, errors, bad


def cli_check(path: str, *extra: str) -> str | None:
    """None if `erofs-nydus check` refused `path` cleanly, else what went wrong."""
    res = subprocess.run([*CLI, "check", path, *extra], capture_output=True, text=True,
                         timeout=120, check=False)
    if "Traceback" in res.stderr:
        return f"check {path}: traceback: {res.stderr[-300:]}"
    if res.returncode not in (0, 1):
        return f"check {path}: exit {res.returncode}"
    if not extra and res.returncode != 1:
        return f"check {path}: a bootstrap the daemon refused passed check"
    for line in res.stderr.splitlines():
        if not line.startswith(path):
            return f"check {path}: stray line {line!r}"
    return None


def main() -> None:
    boot_path, blob_dir, work, seed, count = sys.argv[1:6]
    boot = open(boot_path, "rb").read()  # noqa: SIM115
    rng = random.Random(int(seed))
    regs = regions(boot)
    arrays = index_arrays(boot)
    ext = parse(R.SuperBlockExt, boot, R.EXT_SUPERBLOCK_OFFSET, "ext")
    ct = (int(ext.s_chunk_table_offset), int(ext.s_chunk_table_size) // R.CHUNK_INFO_SIZE)
    known = known_chunks(boot, blob_dir)
    backend = {"type": "local", "dir": blob_dir}
    summary: dict[str, Any] = {"mutants": 0, "refused": 0, "accepted": 0, "chunks_ok": 0,
                               "chunk_errors": 0, "violations": [], "cli_checked": 0}
    seen: set[str] = set()
    for i in range(int(count)):
        m = mutate(boot, rng, regs, arrays, ct)
        digest = hashlib.sha256(m).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        summary["mutants"] += 1
        path = os.path.join(work, f"m{i}.boot")
        with open(path, "wb") as f:
            f.write(m)
        cache = os.path.join(work, f"cache{i}")
        os.mkdir(cache)
        table = ImageTable(cache, durable=False)
        try:
            try:
                table.register(path, backend, os.path.join(work, f"mnt{i}"))
            except ErofsNydusError:
                summary["refused"] += 1
                if summary["cli_checked"] < 8 and (problem := cli_check(path)) is None:
                    summary["cli_checked"] += 1
                elif summary["cli_checked"] < 8:
                    summary["violations"].append(problem)
                continue
            summary["accepted"] += 1
            ok, errors, bad = read_all(m, table, known)
            summary["chunks_ok"] += ok
            summary["chunk_errors"] += errors
            summary["violations"] += [f"mutant {i}: {b}" for b in bad]
            keep = os.path.join(work, f"accepted-{summary['accepted']}.boot")
            os.replace(path, keep)
            if summary["accepted"] <= 3 and (problem := cli_check(keep, "-D", blob_dir)):
                summary["violations"].append(problem)
        except Exception as exc:  # anything but our errors is a violation
            summary["violations"].append(f"mutant {i}: {type(exc).__name__}: {exc}")
        finally:
            table.close()
            shutil.rmtree(cache, ignore_errors=True)
            if os.path.exists(path):
                os.unlink(path)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

