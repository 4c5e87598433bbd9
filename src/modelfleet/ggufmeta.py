"""Read GGUF header metadata with the ``gguf`` package (memory-mapped, tensors never loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelfleet.errors import ConfigError


def read_fields(path: Path) -> dict[str, Any]:
    """Scalar and string metadata of a GGUF file, by key."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path), "r")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable GGUF file: {exc}") from exc
    out: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("tokenizer.ggml."):
            continue  # vocabularies are large and never needed here
        try:
            out[key] = fld.contents()
        except (ValueError, IndexError):
            continue
    return out


def architecture(path: Path) -> str | None:
    """``general.architecture`` of a GGUF file."""
    value = read_fields(path).get("general.architecture")
    return str(value) if value is not None else None
