"""One way to read a JSON-stored dataclass config: unknown fields are an error, not ignored."""
from __future__ import annotations

import dataclasses


def strict_fields(cls, d: dict) -> dict:
    """d unchanged, after checking every key is a field of dataclass `cls` (a clear error otherwise)."""
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    return d
