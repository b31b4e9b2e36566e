"""`stat`: files, chunks, dedup figures per image and across images."""

from __future__ import annotations

import os
from typing import Any

from erofs_nydus.rafs.reader import BootstrapReader, read_bootstrap_bytes


def image_stats(paths: list[str]) -> dict[str, Any]:
    images = []
    all_digests: set[bytes] = set()
    all_blobs: dict[str, int] = {}
    total_ref = 0
    for path in paths:
        r = BootstrapReader(read_bootstrap_bytes(path), os.path.basename(path))
        root = r.tree()
        files = 0
        refs = 0
        ref_bytes = 0
        seen_inodes: set[int] = set()
        digests: set[bytes] = set()
        per_blob: dict[int, dict[str, int]] = {
            b.blob_index: {"chunks_referenced": 0, "bytes_referenced": 0}
            for b in r.image.blobs}
        for _, node in root.walk():
            ino = node.inode
            if not ino.is_reg or id(ino) in seen_inodes:
                continue
            seen_inodes.add(id(ino))
            files += 1
            for c in ino.chunks:
                refs += 1
                ref_bytes += c.uncompressed_size
                digests.add(c.digest)
                per_blob[c.blob_index]["chunks_referenced"] += 1
                per_blob[c.blob_index]["bytes_referenced"] += c.uncompressed_size
        stored = sum(b.chunk_data_size for b in r.image.blobs)
        stored_u = sum(c.uncompressed_size for lst in r.image.chunks for c in lst)
        all_digests |= digests
        for b in r.image.blobs:
            all_blobs[b.blob_id] = b.chunk_data_size
        total_ref += ref_bytes
        images.append({
            "bootstrap": path, "files": files, "inodes": r.sb.inos,
            "chunks_referenced": refs, "unique_chunks": len(digests),
            "bytes_referenced": ref_bytes, "bytes_stored_uncompressed": stored_u,
            "bytes_stored": stored,
            "dedup_ratio": round(1 - stored_u / ref_bytes, 4) if ref_bytes else 0.0,
            "blobs": [{"blob_id": b.blob_id, "chunks": b.chunk_count,
                       "compressor": b.compressor, "digester": b.digester,
                       "compressed_size": b.compressed_size,
                       "chunk_data_size": b.chunk_data_size, "blob_file_size": b.file_size,
                       "uncompressed_size": b.uncompressed_size,
                       **per_blob[b.blob_index]} for b in r.image.blobs],
        })
    stored_all = sum(all_blobs.values())
    return {
        "images": images,
        "total": {"images": len(images), "unique_blobs": len(all_blobs),
                  "unique_chunks": len(all_digests), "bytes_referenced": total_ref,
                  "bytes_stored": stored_all,
                  "dedup_ratio": round(1 - stored_all / total_ref, 4) if total_ref else 0.0},
    }
