"""Registry commands: convert, and check of a converted image by reference."""

from __future__ import annotations

import sys
import time

import click

from erofs_nydus.cli import main
from erofs_nydus.cli.common import check_output, parse_size, write_json


class _Progress:
    """Per-layer byte counts on a terminal (one rewritten line); silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.last = 0.0
        self.label = ""

    def __call__(self, label: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if label == self.label and now - self.last < 0.2 and done < total:
            return
        if label != self.label and self.label:
            sys.stderr.write("\n")
        self.label, self.last = label, now
        pct = f" {done * 100 // total:3d}%" if total else ""
        sys.stderr.write(f"\r{label}: {done / 1e6:8.1f} / {total / 1e6:.1f} MB{pct}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.label:
            sys.stderr.write("\n")


def _client_options(plain_http: bool) -> dict[str, object]:
    # plain HTTP only where asked; loopback registries are the usual case in tests
    return {"plain_http": True} if plain_http else {"plain_http": "loopback"}


@main.command()
@click.option("--source", required=True, metavar="REF",
              help="OCI image: host[:port]/repo[:tag|@digest] or oci:DIR[:tag].")
@click.option("--target", required=True, metavar="REF",
              help="Where to push the Nydus image (registry reference or oci:DIR[:tag]).")
@click.option("--plain-http", is_flag=True,
              help="Talk HTTP, not HTTPS, to the registries (loopback registries use HTTP "
                   "automatically).")
@click.option("--platform", metavar="OS/ARCH", help="Platform to pick from an index "
              "(default linux/amd64).")
@click.option("--chunk-dict", "chunk_dicts", multiple=True, metavar="BOOTSTRAP",
              help="Reuse chunks stored in this image's blobs (repeatable).")
@click.option("--compressor", type=click.Choice(["zstd", "lz4", "none"]), default="zstd",
              show_default=True,
              help="Per-chunk compression; zstd (nydusify's default) stores ~28% fewer bytes "
                   "than lz4.")
@click.option("--digester", type=click.Choice(["blake3", "sha256"]), default="blake3",
              show_default=True, help="Chunk digest; blake3 is nydusify's default.")
@click.option("--chunk-size", default="0x100000", show_default=True)
@click.option("--cache-dir", default="/var/cache/erofs_nydus/convert", show_default=True,
              help="Converted layers (bootstraps and blobs), reused when a layer with the same "
                   "digest is converted again.")
@click.option("--prefetch-trace", metavar="FILE",
              help="Access trace (`erofs-nydus trace`) of a workload on a mount of this image "
                   "converted without it (same options): push one blob with the traced chunks "
                   "first and a prefetch table the daemon fetches on mount.")
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Layers converted at once.")
@click.option("--output-json", "-J", metavar="FILE", help="Write the result as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
def convert(source: str, target: str, plain_http: bool, platform: str | None,
            chunk_dicts: tuple[str, ...], compressor: str, digester: str, chunk_size: str,
            cache_dir: str, prefetch_trace: str | None, jobs: int, output_json: str | None,
            quiet: bool) -> None:
    """Convert an OCI image into a Nydus (RAFS v6) image and push it.

    Each source layer is streamed (never unpacked to disk) into a data blob; the layer
    bootstraps are merged into one bootstrap pushed as the last layer, the way Nydus
    users expect (nydus-snapshotter conventions).  With --prefetch-trace the image is
    optimized for the traced workload before the push (see `optimize`).
    """
    from erofs_nydus import batch_gc
    from erofs_nydus.registry.convert import ConvertOptions, convert_image

    batch_gc()
    check_output(output_json, "--output-json")
    progress = _Progress(enabled=not quiet and sys.stderr.isatty())

    def warn(msg: str) -> None:
        progress.close()
        click.echo(f"erofs-nydus: warning: {msg}", err=True)

    opts = ConvertOptions(chunk_size=parse_size(chunk_size), compressor=compressor,
                          digester=digester, chunk_dicts=list(chunk_dicts), platform=platform,
                          cache_dir=cache_dir, client_options=_client_options(plain_http),
                          prefetch_trace=prefetch_trace, jobs=jobs)
    try:
        result = convert_image(source, target, opts, progress, warn)
    finally:
        progress.close()
    if output_json:
        write_json(result.to_json(), output_json)
    if output_json != "-":
        click.echo(f"converted {source} -> {target} ({result.manifest_digest}): "
                   f"{len(result.blobs)} blobs, {result.layers_converted} layers converted, "
                   f"{result.layers_cached} from cache")
        if result.prefetch is not None:
            pf = result.prefetch
            click.echo(f"optimized by {prefetch_trace}: {pf.prefetch_files} prefetch files, "
                       f"{pf.prefetch_chunks} chunks ({pf.prefetch_bytes} bytes) placed first")
