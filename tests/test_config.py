"""Config file: defaults, file values, flags override, malformed files name the line or key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from daemon_support import run_cli

from erofs_nydus.config import Config, apply_backend_config, load_config, parse_size, to_toml
from erofs_nydus.errors import UsageError

GOOD = """
[daemon]
cache_dir = "/var/cache/x"
mode = "fanotify"
amplify = "512K"

[prefetch]
enable = false
threads = 8
bandwidth = "20M"

[backend]
retries = 5
deadline = 12
credentials = "/root/.docker/config.json"
plain_http = true

[fscache]
buffered_cache = false
"""


def test_sizes() -> None:
    assert parse_size(4096) == 4096
    assert parse_size("1M") == 1 << 20
    assert parse_size("2GiB") == 2 << 30
    assert parse_size(" 10 k ") == 10240
    for bad in ("-1", "1.5M", "lots", True, -3, 2.0):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_defaults_without_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("EROFS_NYDUS_CONFIG", raising=False)
    monkeypatch.setattr("erofs_nydus.config.DEFAULT_CONFIG_PATH", str(tmp_path / "none.toml"))
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.amplify == 1 << 20 and cfg.prefetch and cfg.prefetch_threads == 4
    assert cfg.fscache_buffered_cache is True  # on wherever the cache's filesystem allows


def test_file_values(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(GOOD)
    cfg = load_config(str(p))
    assert cfg.cache_dir == "/var/cache/x" and cfg.mode == "fanotify" and cfg.amplify == 512 << 10
    assert not cfg.prefetch and cfg.prefetch_threads == 8 and cfg.prefetch_bandwidth == 20 << 20
    assert cfg.retries == 5 and cfg.deadline == 12.0 and cfg.plain_http
    assert cfg.fscache_buffered_cache is False
    assert cfg.docker_config_dir() == "/root/.docker"
    assert cfg.register_args() == {"prefetch": False, "prefetch_threads": 8,
                                   "prefetch_bandwidth": 20 << 20}  # fmt: skip
    spec = apply_backend_config({"type": "registry", "repo": "h/r"}, cfg)
    assert spec["retries"] == 5 and spec["docker_config"] == "/root/.docker"
    assert apply_backend_config({"type": "local", "dir": "/b"}, cfg) == {"type": "local",
                                                                         "dir": "/b"}
    # round trip: the TOML `config show` prints loads back to the same settings
    (tmp_path / "again.toml").write_text(to_toml(cfg))
    again = load_config(str(tmp_path / "again.toml"))
    again.source = cfg.source
    assert again == cfg


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[daemon]\namplify = \n", "line 2"),
        ("[daemon]\nmode = 'auto'\n[daemon\n", "line 3"),
        ("[daemon]\namplfy = 3\n", "unknown key daemon.amplfy"),
        ("[fscache]\nbuffered_cache = 1\n", "fscache.buffered_cache: expected true or false"),
        ("[prefetch]\nthreads = \"x\"\n", "prefetch.threads: expected an integer, got 'x'"),
        ("[prefetch]\nthreads = 0\n", "prefetch.threads: expected 1..256, got 0"),
        ("[prefetch]\nbandwidth = \"fast\"\n", "prefetch.bandwidth: expected a size"),
        ("[daemon]\nmode = \"fuse\"\n", "daemon.mode: expected one of auto, fanotify, fscache"),
        ("[backend]\nplain_http = \"yes\"\n", "backend.plain_http: expected true or false"),
        ("[backend]\ndeadline = -1\n", "backend.deadline: expected a positive number"),
        ("[cache]\nsize = 1\n", "unknown section [cache]"),
        ("amplify = 1\n", "'amplify' must be a section"),
    ],
)
def test_malformed_config_names_line_or_key(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(UsageError) as ei:
        load_config(str(p))
    assert message in str(ei.value) and str(p) in str(ei.value)
    proc = run_cli("config", "show", "--config", str(p), check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    proc = run_cli("config", "show", "--config", str(tmp_path / "nope.toml"), check=False)
    assert proc.returncode == 2 and "no such file" in proc.stderr


def test_config_show_flags_override_file(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(GOOD)
    doc = json.loads(run_cli("config", "show", "--config", str(p), "--json").stdout)
    assert doc["amplify"] == 512 << 10 and doc["prefetch_threads"] == 8
    doc = json.loads(run_cli(
        "config", "show", "--config", str(p), "--json", "--amplify", "2M", "--prefetch",
        "--prefetch-threads", "2", "--prefetch-bandwidth", "1M", "--retries", "0",
        "--cache-dir", "/c", "--mode", "auto", "--no-plain-http", "--read-deadline", "3",
        "--credentials", "/etc/creds",
    ).stdout)  # fmt: skip
    assert doc["amplify"] == 2 << 20 and doc["prefetch"] is True
    assert doc["prefetch_threads"] == 2 and doc["prefetch_bandwidth"] == 1 << 20
    assert doc["retries"] == 0 and doc["cache_dir"] == "/c" and doc["mode"] == "auto"
    assert doc["plain_http"] is False and doc["deadline"] == 3.0
    assert doc["credentials"] == "/etc/creds"
    text = run_cli("config", "show", "--config", str(p)).stdout
    assert "[prefetch]\nenable = false\nthreads = 8\nbandwidth = 20971520" in text


def test_env_var_names_the_default_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "env.toml"
    p.write_text("[prefetch]\nthreads = 3\n")
    monkeypatch.setenv("EROFS_NYDUS_CONFIG", str(p))
    assert load_config(None).prefetch_threads == 3
    doc = json.loads(run_cli("config", "show", "--json").stdout)
    assert doc["prefetch_threads"] == 3 and doc["source"] == str(p)


def test_mount_reads_the_config(tmp_path: Path) -> None:
    """`mount` takes its cache dir from the config: without either it is a usage error."""
    boot = tmp_path / "x.boot"
    boot.write_bytes(b"")
    (tmp_path / "mp").mkdir()
    proc = run_cli("mount", str(boot), str(tmp_path / "mp"), "--blob-dir", str(tmp_path),
                   "--config", str(tmp_path / "none.toml"), check=False)  # fmt: skip
    assert proc.returncode == 2 and "no such file" in proc.stderr
    (tmp_path / "c.toml").write_text("[daemon]\namplify = \"bad\"\n")
    proc = run_cli("mount", str(boot), str(tmp_path / "mp"), "--blob-dir", str(tmp_path),
                   "--config", str(tmp_path / "c.toml"), check=False)  # fmt: skip
    assert proc.returncode == 2 and "daemon.amplify" in proc.stderr
