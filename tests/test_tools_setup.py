"""`tools/setup` installs into a virtualenv of its own and says which interpreter to use
(issue 11: never `pip install -e` into whatever python3 is first on PATH)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import erofs_nydus

ROOT = Path(erofs_nydus.__file__).resolve().parent.parent
SETUP = ROOT / "tools" / "setup"

pytestmark = pytest.mark.slow


@pytest.mark.skipif(os.geteuid() != 0, reason="tools/setup runs as root (apt-get)")
def test_setup_installs_into_its_own_venv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    env = {**os.environ, "EROFS_NYDUS_VENV": str(venv)}
    env.pop("PYTHONPATH", None)
    runs = [subprocess.run([str(SETUP)], capture_output=True, text=True, env=env, timeout=900,
                           check=False) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout == f"{venv}/bin/python\n"  # the only line on stdout
    assert "installing Python packages" in runs[0].stderr
    assert "installing" not in runs[1].stderr  # the stamp: nothing to redo
    py = str(venv / "bin" / "python")
    probe = subprocess.run(
        [py, "-c", "import sys, erofs_nydus, erofs_nydus._native._fanotify, pytest\n"
                   "print(erofs_nydus.__file__); print(sys.prefix)"],
        capture_output=True, text=True, env=env, cwd="/", timeout=60, check=True)
    where, prefix = probe.stdout.split()
    assert where == str(ROOT / "erofs_nydus" / "__init__.py")  # editable: this checkout
    assert prefix == str(venv)
