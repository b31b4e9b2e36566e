"""Helpers shared by the layout modules: parse/build that raise only our errors."""

from __future__ import annotations

from typing import Any

import construct as cs

from erofs_nydus.errors import FormatError

BLOCK_SIZE = 4096
BLOCK_BITS = 12


def align(value: int, unit: int) -> int:
    """Round `value` up to a multiple of `unit` (a power of two)."""
    return (value + unit - 1) & ~(unit - 1)


def parse(struct: cs.Construct, data: bytes | bytearray | memoryview, offset: int = 0,
          what: str = "") -> Any:
    """Parse `struct` at `offset`; a short or malformed buffer raises `FormatError`."""
    size = struct.sizeof()
    chunk = bytes(data[offset:offset + size])
    if len(chunk) != size:
        raise FormatError(
            f"{what or 'structure'} at offset {offset}: need {size} bytes, have {len(chunk)}"
        )
    try:
        return struct.parse(chunk)
    except cs.ConstructError as exc:
        raise FormatError(f"{what or 'structure'} at offset {offset}: {exc}") from exc


def build(struct: cs.Construct, values: dict[str, Any]) -> bytes:
    """Build `struct` from a dict; a value out of range raises `FormatError`."""
    try:
        return bytes(struct.build(values))
    except (cs.ConstructError, OverflowError, TypeError, ValueError) as exc:
        raise FormatError(f"cannot encode structure: {exc}") from exc
