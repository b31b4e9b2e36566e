"""The small fleet case of issue 14 in CI: `bench/fleet.py --nodes 4` for real - four
network namespaces, each with its own daemon and cache dir, cold-starting the
debootstrap image at once (`mount REF` + `dpkg -l; ls /usr/bin` in a chroot) through
one tbf-shaped link to the origin docker-registry, directly, through the nginx
slice-caching proxy and from a pull-through mirror filled by `warm --mirrors-only`.
Every node's workload must succeed (the bench stops otherwise); the assertions are on
what crossed the origin's link (its veth counters), never on times."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_support import fanotify_usable

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not fanotify_usable(), reason="needs root and pre-content fanotify"),
    pytest.mark.timeout(900),
]


def test_four_nodes_cold_start_through_proxy_and_warmed_mirror(tmp_path: Path) -> None:
    for tool in ("nginx", "skopeo", "umoci", "ip", "tc", "nsenter"):
        assert shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists(), tool
    out = tmp_path / "fleet.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fleet.py"), "--nodes", "4",
         "--modes", "direct,proxy,warm", "--json", str(out)],
        capture_output=True, text=True, timeout=840, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    fig, data = doc["figures"], doc["data_size"]
    direct, proxy, warm = fig["direct/4"], fig["proxy/4"], fig["warm/4"]
    print(proc.stdout, file=sys.stderr)
    ws = direct["node_fetch"]  # one node's working set (compressed bytes it fetched)
    assert 0 < ws < data / 4, (ws, data)
    # direct: every node fetches its own working set over the shared link
    assert direct["origin"] >= 3.5 * ws, direct
    # the caching proxy: one working set whatever N, rounded up to nginx's 1 MiB slices
    # (measured: 3.0 working sets at N = 1 and at N = 32; uncached it would be >= 4 x 3.0)
    assert proxy["origin"] <= 3.5 * ws and proxy["origin"] < 0.8 * direct["origin"], proxy
    assert proxy["node_fetch"] == pytest.approx(ws, rel=0.05), proxy
    # the warmed mirror: warming costs about one copy of the data, the burst nothing
    assert data * 0.9 <= warm["warming"] <= data * 1.5, (warm, data)
    assert warm["origin"] < 1 * MiB, warm
    assert warm["node_fetch"] == pytest.approx(ws, rel=0.05), warm
