"""tests/THREAT_MODEL.md names the tests that hold each claim: every name must exist."""

from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).parent


def test_every_test_named_in_the_threat_model_exists() -> None:
    text = (HERE / "THREAT_MODEL.md").read_text()
    defined: dict[str, set[str]] = {}
    for path in HERE.glob("test_*.py"):
        defined[path.name] = set(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M))
    every = set().union(*defined.values())
    missing = []
    for ref in re.findall(r"`([^`]+)`", text):
        fname, _, name = ref.partition("::")
        if fname.startswith("test_") and fname.endswith(".py"):
            if fname not in defined or (name and name not in defined[fname]):
                missing.append(ref)
        elif re.fullmatch(r"test_[\w*]+", ref):
            pattern = re.compile(ref.replace("*", r"\w*") + "$")
            if not any(pattern.match(t) for t in every):
                missing.append(ref)
    assert not missing, f"THREAT_MODEL.md names tests that do not exist: {missing}"
    assert len(re.findall(r"`test_", text)) > 40  # the document really cites its tests
