"""Image commands: create, check, inspect."""

from __future__ import annotations

import os
import stat
import sys

import click

from erofs_nydus.cli import main
from erofs_nydus.cli.common import check_output, check_output_dir, parse_size, write_json
from erofs_nydus.errors import UsageError


def _is_path(arg: str) -> bool:
    """A command-line argument that names a file: it exists, or looks like a path
    (./x, ../x, /x), so a missing one is reported as a missing file, not parsed as
    an image reference."""
    return arg in (".", "..") or arg.startswith(("./", "../", "/")) or os.path.lexists(arg)


@main.command()
@click.argument("source")
@click.option("--bootstrap", "-B", required=True, metavar="FILE",
              help="Where to write the RAFS v6 bootstrap (image metadata).")
@click.option("--blob-dir", "-D", required=True, metavar="DIR",
              help="Directory for the data blob, written as DIR/<sha256 of the blob>.")
@click.option("--blob-cache-dir", metavar="DIR",
              help="Also write DIR/<blob id>.blob.data: the blob's uncompressed 4 KiB-aligned "
                   "address space, ready to mount without a daemon.")
@click.option("--chunk-size", default="0x100000", show_default=True,
              help="Chunk size, a power of two from 0x1000 to 0x1000000.")
@click.option("--compressor", type=click.Choice(["zstd", "lz4", "none"]), default="zstd",
              show_default=True,
              help="Per-chunk compression (zstd frame or lz4 block); zstd blobs are ~28% "
                   "smaller and decode as fast as lz4 + sha256 with blake3 (README, Measured).")
@click.option("--digester", type=click.Choice(["blake3", "sha256"]), default="blake3",
              show_default=True, help="Chunk digest (blake3: nydus-image's default, and "
                                      "needed to share chunks with images it built).")
@click.option("--chunk-dict", "chunk_dicts", multiple=True, metavar="BOOTSTRAP",
              help="Reuse chunks already stored in this image's blobs (repeatable).")
@click.option("--whiteout-spec", type=click.Choice(["oci", "overlayfs", "none"]),
              default="none", show_default=True,
              help="How whiteouts in SOURCE are recorded; 'none' keeps them as plain entries "
                   "for a later `merge`.")
@click.option("--output-json", "-J", metavar="FILE",
              help="Write blob ids, sizes, chunk counts and dedup figures as JSON ('-' = stdout).")
def create(source: str, bootstrap: str, blob_dir: str, blob_cache_dir: str | None,
           chunk_size: str, compressor: str, digester: str, chunk_dicts: tuple[str, ...],
           whiteout_spec: str, output_json: str | None) -> None:
    """Build SOURCE into a RAFS v6 bootstrap plus one chunked data blob.

    SOURCE is a directory, a .tar or .tar.gz file, or '-' for a tar/tar.gz stream on
    stdin (gzip is detected by its magic).  Tar input is streamed, never unpacked.
    Identical chunks are stored once.  The same input and options always give
    byte-identical output.
    """
    from erofs_nydus.builder import BuildOptions, create_image

    check_output(bootstrap, "--bootstrap")
    check_output(output_json, "--output-json")
    check_output_dir(blob_dir, "--blob-dir")
    check_output_dir(blob_cache_dir, "--blob-cache-dir")
    opts = BuildOptions(chunk_size=parse_size(chunk_size), compressor=compressor,
                        digester=digester, blob_cache_dir=blob_cache_dir,
                        chunk_dicts=list(chunk_dicts), whiteout_spec=whiteout_spec)
    result = create_image(source, bootstrap, blob_dir, opts)
    if output_json:
        write_json(result.to_json(), output_json)
    if output_json != "-":
        s = result.stats
        blob = result.new_blob
        click.echo(f"bootstrap {bootstrap}: {result.bootstrap_size} bytes, {result.inodes} inodes")
        if blob is not None:
            click.echo(f"blob {blob.blob_id}: {s.chunks_stored} chunks, "
                       f"{s.bytes_stored_compressed} bytes stored "
                       f"({s.bytes_stored_uncompressed} uncompressed), "
                       f"{s.chunks_deduplicated} duplicate chunks skipped")
        else:
            click.echo("no data blob (the source has no file data)")


@main.command()
@click.argument("bootstrap", metavar="BOOTSTRAP|REF")
@click.option("--blob-dir", "-D", metavar="DIR",
              help="Also verify every blob in DIR: its id, chunk-info table and each chunk's "
                   "sha256.")
@click.option("--source", metavar="REF",
              help="For an image REF: the original OCI image; compare every file (metadata "
                   "and content) with it.")
@click.option("--plain-http", is_flag=True, help="For an image REF: talk HTTP to registries.")
@click.option("--platform", metavar="OS/ARCH", help="For an image REF: platform to check.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(bootstrap: str, blob_dir: str | None, source: str | None, plain_http: bool,
          platform: str | None, as_json: bool) -> None:
    """Validate a bootstrap file, or a converted image by reference; exit 1 and list
    each problem.

    A file is checked against the RAFS v6 rules (and with --blob-dir, every chunk).  A
    reference (host/repo:tag or oci:DIR:tag) that is not a local file is checked for
    the Nydus manifest conventions, its bootstrap, every chunk of every blob, and with
    --source the whole tree against the original OCI image.
    """
    from erofs_nydus.rafs.check import check_bootstrap
    from erofs_nydus.rafs.reader import read_bootstrap_bytes

    if not _is_path(bootstrap) and (":" in bootstrap or "/" in bootstrap):
        _check_ref(bootstrap, source, plain_http, platform, as_json)
        return
    if source is not None:
        raise UsageError("--source applies to an image reference, not a bootstrap file")
    data = read_bootstrap_bytes(bootstrap)
    report = check_bootstrap(data, os.path.basename(bootstrap), blob_dir)
    if as_json:
        write_json({"ok": report.ok, "problems": report.problems, "inodes": report.inodes,
                     "blobs": report.blobs, "chunks_verified": report.chunks_verified}, None)
    else:
        for p in report.problems:
            click.echo(f"{bootstrap}: {p}", err=True)
        if report.ok:
            extra = f", {report.chunks_verified} chunks verified" if blob_dir else ""
            click.echo(f"{bootstrap}: OK ({report.inodes} inodes, {report.blobs} blobs{extra})")
    if not report.ok:
        sys.exit(1)


def _check_ref(ref: str, source: str | None, plain_http: bool, platform: str | None,
               as_json: bool) -> None:
    from erofs_nydus.registry.remote_check import check_remote

    opts: dict[str, object] = {"plain_http": True} if plain_http else {"plain_http": "loopback"}
    report = check_remote(ref, source, platform=platform, client_options=opts)
    if as_json:
        write_json({"ok": report.ok, "problems": report.problems, "blobs": report.blobs,
                     "chunks_verified": report.chunks_verified,
                     "entries_compared": report.entries_compared}, None)
    else:
        for p in report.problems:
            click.echo(f"{ref}: {p}", err=True)
        if report.ok:
            extra = f", {report.entries_compared} entries match the source" if source else ""
            click.echo(f"{ref}: OK ({report.blobs} blobs, {report.chunks_verified} chunks "
                       f"verified{extra})")
    if not report.ok:
        sys.exit(1)


@main.command()
@click.argument("bootstrap")
@click.argument("path", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect(bootstrap: str, path: str | None, as_json: bool) -> None:
    """List the image tree, or show one PATH's inode, chunks and blob mapping."""
    from erofs_nydus.rafs.inspect import image_summary, inspect_path, list_tree
    from erofs_nydus.rafs.reader import BootstrapReader, read_bootstrap_bytes

    reader = BootstrapReader(read_bootstrap_bytes(bootstrap), os.path.basename(bootstrap))
    if path is not None:
        info = inspect_path(reader, path)
        if as_json:
            write_json(info, None)
            return
        for key, value in info.items():
            if key == "chunks":
                click.echo(f"chunks: {len(value)}")
                for c in value:
                    click.echo(f"  @{c['file_offset']:#x} blob {c['blob_index']} "
                               f"({c['blob_id'][:12]}) ci#{c['ci_index']} "
                               f"c={c['compressed_offset']:#x}+{c['compressed_size']} "
                               f"u={c['uncompressed_offset']:#x}+{c['uncompressed_size']} "
                               f"{c['digester']}={c['digest'][:16]}"
                               + ("" if c["compressed"] else " raw"))
            else:
                click.echo(f"{key}: {value}")
        return
    summary = image_summary(reader)
    entries = list_tree(reader)
    if as_json:
        write_json({"image": summary, "entries": entries}, None)
        return
    click.echo(f"fsid {summary['fsid']}  chunk size {summary['chunk_size']:#x}  "
               f"{summary['inodes']} inodes  {len(summary['blobs'])} blobs")
    for b in summary["blobs"]:
        click.echo(f"  device {b['device_id']}: {b['blob_id']} {b['chunk_count']} chunks "
                   f"{b['compressed_size']} -> {b['uncompressed_size']} bytes")
    for e in entries:
        mode = stat.filemode(int(e["mode"], 8) | _type_bits(e["type"]))
        tail = f" -> {e['target']}" if "target" in e else ""
        click.echo(f"{mode} {e['uid']:>6} {e['gid']:>6} {e['size']:>12} {e['path']}{tail}")


def _type_bits(t: str) -> int:
    return {"d": stat.S_IFDIR, "-": stat.S_IFREG, "l": stat.S_IFLNK, "c": stat.S_IFCHR,
            "b": stat.S_IFBLK, "p": stat.S_IFIFO, "s": stat.S_IFSOCK}.get(t, 0)


@main.command()
@click.argument("layers", nargs=-1, required=True, metavar="BOOTSTRAP...")
@click.option("--bootstrap", "-B", required=True, metavar="FILE",
              help="Where to write the merged bootstrap.")
@click.option("--allow-missing-whiteouts", is_flag=True,
              help="Warn instead of failing when a whiteout has nothing below to remove.")
@click.option("--output-json", "-J", metavar="FILE", help="Write the result as JSON.")
def merge(layers: tuple[str, ...], bootstrap: str, allow_missing_whiteouts: bool,
          output_json: str | None) -> None:
    """Flatten layer bootstraps (bottom layer first) into one image bootstrap.

    OCI rules apply: `.wh.NAME` removes NAME from the layers below, `.wh..wh..opq`
    hides a directory's lower contents, a file replaces a directory (and vice versa).
    The merged device table lists every blob still referenced, bottom to top; mount
    it with the blobs' cache files in that order.
    """
    from erofs_nydus.builder.merge import merge_bootstraps

    check_output(bootstrap, "--bootstrap")
    check_output(output_json, "--output-json")
    def warn(msg: str) -> None:
        click.echo(f"erofs-nydus: warning: {msg}", err=True)

    result = merge_bootstraps(list(layers), bootstrap,
                              warn if allow_missing_whiteouts else None)
    if output_json:
        write_json(result.to_json(), output_json)
    if output_json != "-":
        click.echo(f"bootstrap {bootstrap}: {result.bootstrap_size} bytes, {result.inodes} "
                   f"inodes, {len(result.blobs)} blobs")


@main.command(name="stat")
@click.argument("bootstraps", nargs=-1, required=True, metavar="BOOTSTRAP...")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def stat_cmd(bootstraps: tuple[str, ...], as_json: bool) -> None:
    """Files, chunks, unique chunks and bytes stored vs referenced, per image and blob."""
    from erofs_nydus.rafs.stats import image_stats

    info = image_stats(list(bootstraps))
    if as_json:
        write_json(info, None)
        return
    for img in info["images"]:
        click.echo(f"{img['bootstrap']}: {img['files']} files, {img['chunks_referenced']} chunk "
                   f"refs, {img['unique_chunks']} unique chunks, "
                   f"{img['bytes_referenced']} bytes referenced, {img['bytes_stored']} stored "
                   f"(dedup {img['dedup_ratio']:.1%})")
        for b in img["blobs"]:
            click.echo(f"  blob {b['blob_id'][:16]}: {b['chunks']} chunks, "
                       f"{b['chunk_data_size']} bytes of {b['compressor']} chunk data "
                       f"({b['blob_file_size']} bytes file, {b['digester']} digests), "
                       f"{b['chunks_referenced']} refs")
    t = info["total"]
    if len(info["images"]) > 1:
        click.echo(f"total: {t['unique_blobs']} blobs, {t['unique_chunks']} unique chunks, "
                   f"{t['bytes_stored']} bytes stored for {t['bytes_referenced']} referenced "
                   f"(dedup {t['dedup_ratio']:.1%})")


@main.command()
@click.argument("bootstrap")
@click.option("--blob-dir", "-D", required=True, metavar="DIR", help="The image's blobs.")
@click.option("--trace", metavar="FILE", help="Access trace from `erofs-nydus trace`.")
@click.option("--prefetch-list", metavar="FILE",
              help="Paths (one per line, directories recurse) to place first instead.")
@click.option("--output-bootstrap", "-B", "out_boot", required=True, metavar="FILE",
              help="Where to write the optimized bootstrap.")
@click.option("--output-blob-dir", "out_blobs", metavar="DIR",
              help="Directory for the new blob (default: --blob-dir).")
@click.option("--output-json", "-J", metavar="FILE", help="Write the result as JSON.")
def optimize(bootstrap: str, blob_dir: str, trace: str | None, prefetch_list: str | None,
             out_boot: str, out_blobs: str | None, output_json: str | None) -> None:
    """Rebuild an image so a workload's data comes first, with a prefetch table.

    The chunks the trace (or the listed files) read are laid out first, in access
    order and contiguous, followed by the rest; the bootstrap's prefetch table names the
    files touched.  Mounting the result prefetches them in the background.
    """
    from erofs_nydus.builder.optimize import optimize_image

    check_output(out_boot, "--output-bootstrap")
    check_output(output_json, "--output-json")
    check_output_dir(out_blobs, "--output-blob-dir")
    res = optimize_image(bootstrap, blob_dir, out_boot, out_blobs or blob_dir, trace=trace,
                         prefetch_list=prefetch_list)
    if output_json:
        write_json(res.to_json(), output_json)
    if output_json != "-":
        click.echo(f"bootstrap {out_boot}: blob {res.blob.blob_id if res.blob else '-'}, "
                   f"{res.prefetch_files} prefetch files, {res.prefetch_chunks} chunks "
                   f"({res.prefetch_bytes} bytes) placed first")
