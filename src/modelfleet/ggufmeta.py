"""Read GGUF headers: metadata keys, array lengths and tensor sizes, never tensor data.

The header is parsed with the ``gguf`` package's own type tables (``GGUFValueType``,
``GGML_QUANT_SIZES``) by a small reader that walks the file once and skips long arrays
without building them. ``gguf.GGUFReader`` gives the same answers (the tests compare
them) but builds every vocabulary entry as a Python object: 2 s for SmolLM2's 49k
tokens, several seconds for a 150k-token Qwen model, too slow to plan a stack of
fifteen servers.

:func:`model_info` turns a header into the shape facts the memory estimate needs,
following llama.cpp's own hparams loading (``src/llama-model.cpp``,
``src/llama-hparams.cpp``, ``src/models/<arch>.cpp``): KV heads per layer, key and
value head sizes, which layers use a sliding window, which are recurrent.
"""

from __future__ import annotations

import functools
import mmap
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelfleet.errors import ConfigError

GGUF_MAGIC = b"GGUF"
MAX_PARSED_ARRAY = 4096  # longer arrays (vocabularies, merges) are skipped; their length is kept

__all__ = [
    "Header",
    "ModelInfo",
    "architecture",
    "info_from_fields",
    "model_info",
    "read_fields",
    "read_header",
    "shard_paths",
]


@dataclass(frozen=True)
class Header:
    """What a GGUF header holds, without the tensor data."""

    version: int
    fields: dict[str, Any]  # scalars, strings, and arrays up to MAX_PARSED_ARRAY items
    array_lengths: dict[str, int]  # every array's length, parsed or skipped
    tensor_count: int
    tensor_bytes: int  # the sum of every tensor's data size


class _Cursor:
    """Sequential reads from a memory-mapped file, in the file's byte order."""

    def __init__(self, buf: mmap.mmap, order: str) -> None:
        self.buf = buf
        self.pos = 0
        self.order = order

    def unpack(self, fmt: str) -> Any:
        st = struct.Struct(self.order + fmt)
        (value,) = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return value

    def string(self) -> str:
        n = self.unpack("Q")
        raw = self.buf[self.pos : self.pos + n]
        if len(raw) != n:
            raise ValueError("the file ends inside a string")
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        st = struct.Struct(self.order + "Q")
        for _ in range(count):
            (n,) = st.unpack_from(self.buf, self.pos)
            self.pos += 8 + n


def _value_formats() -> dict[int, str]:
    import gguf

    t = gguf.GGUFValueType
    return {
        int(t.UINT8): "B",
        int(t.INT8): "b",
        int(t.UINT16): "H",
        int(t.INT16): "h",
        int(t.UINT32): "I",
        int(t.INT32): "i",
        int(t.FLOAT32): "f",
        int(t.BOOL): "?",
        int(t.UINT64): "Q",
        int(t.INT64): "q",
        int(t.FLOAT64): "d",
    }


def _read_value(cur: _Cursor, vtype: int, key: str, lengths: dict[str, int]) -> Any:
    import gguf

    formats = _value_formats()
    if vtype in formats:
        return cur.unpack(formats[vtype])
    if vtype == int(gguf.GGUFValueType.STRING):
        return cur.string()
    if vtype != int(gguf.GGUFValueType.ARRAY):
        raise ValueError(f"unknown value type {vtype} for key {key!r}")
    item_type, count = cur.unpack("I"), cur.unpack("Q")
    lengths[key] = count
    if count > MAX_PARSED_ARRAY:
        _skip_array(cur, item_type, count)
        return None
    return [_read_value(cur, item_type, key, {}) for _ in range(count)]


def _skip_array(cur: _Cursor, item_type: int, count: int) -> None:
    import gguf

    formats = _value_formats()
    if item_type in formats:
        cur.pos += struct.calcsize(formats[item_type]) * count
    elif item_type == int(gguf.GGUFValueType.STRING):
        cur.skip_strings(count)
    else:
        for _ in range(count):
            _read_value(cur, item_type, "", {})


def _tensor_bytes(cur: _Cursor, count: int) -> int:
    import gguf

    total = 0
    for _ in range(count):
        cur.string()  # name
        n_dims = cur.unpack("I")
        n_elements = 1
        for _ in range(n_dims):
            n_elements *= cur.unpack("Q")
        ttype = cur.unpack("I")
        cur.unpack("Q")  # offset
        try:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        except (ValueError, KeyError) as exc:
            raise ValueError(f"tensor type {ttype} is unknown to this gguf package; upgrade gguf") from exc
        total += n_elements // block * size
    return total


def read_header(path: Path) -> Header:
    """Parse the header of one GGUF file (one shard of a split model)."""
    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf)
    except (OSError, ValueError, struct.error) as exc:
        raise ConfigError(f"{path} is not a readable GGUF file: {exc}") from exc


def _parse(buf: mmap.mmap) -> Header:
    if buf[:4] != GGUF_MAGIC:
        raise ValueError(f"it starts with {bytes(buf[:4])!r}, not {GGUF_MAGIC!r}")
    (version,) = struct.unpack_from("<I", buf, 4)
    order = "<" if version & 0xFFFF else ">"  # a big-endian file reads as 0x03000000 here
    cur = _Cursor(buf, order)
    cur.pos = 4
    version = cur.unpack("I")
    n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
    fields: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    for _ in range(n_kv):
        key = cur.string()
        value = _read_value(cur, cur.unpack("I"), key, lengths)
        if value is not None:
            fields[key] = value
    return Header(version, fields, lengths, n_tensors, _tensor_bytes(cur, n_tensors))


def read_fields(path: Path) -> dict[str, Any]:
    """Metadata of a GGUF file by key, without the tokenizer's vocabulary arrays."""
    return {k: v for k, v in read_header(path).fields.items() if not k.startswith("tokenizer.ggml.")}


def architecture(path: Path) -> str | None:
    """``general.architecture`` of a GGUF file."""
    value = read_header(path).fields.get("general.architecture")
    return str(value) if value is not None else None


_SHARD = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def shard_paths(path: Path, count: int) -> list[Path]:
    """Every shard of a split model, named as llama.cpp's ``llama_split_path`` names them."""
    m = _SHARD.match(path.name)
    if count <= 1 or m is None:
        return [path]
    return [path.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


# --- the shape facts the memory estimate needs --------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """A model's shape as llama.cpp sees it, from the header alone."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    head_kv: tuple[int, ...]  # KV heads of each layer; 0 = the layer keeps no KV cache
    head_k: int  # key size per head
    head_v: int  # value size per head
    n_ff: int  # the widest feed-forward a token goes through (dense, or the active experts)
    n_ctx_train: int
    n_vocab: int
    n_swa: int  # sliding-window size; 0 = none
    swa_layers: tuple[bool, ...]
    recurrent_layers: tuple[bool, ...]
    recurrent_state_floats: int  # f32 values per recurrent layer and sequence (conv + ssm state)
    weights_bytes: int
    shards: int = 1

    @property
    def q_width(self) -> int:
        return self.n_head * self.head_k

    @property
    def kv_width(self) -> int:
        return max(self.head_kv, default=0) * (self.head_k + self.head_v)


def model_info(path: Path) -> ModelInfo:
    """Shape facts and total tensor bytes of a model, every shard of a split model included."""
    header = _header(path)
    count = int(header.fields.get("split.count", 1) or 1)
    shards = shard_paths(path, count)
    weights = header.tensor_bytes
    for shard in shards[1:]:
        if not shard.is_file():
            raise ConfigError(f"{path} is split in {count} files but {shard} is missing; download every shard")
        weights += _header(shard).tensor_bytes
    try:
        return info_from_fields(header.fields, header.array_lengths, weights, shards=len(shards))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: the header lacks what a memory estimate needs ({exc})") from exc


def _header(path: Path) -> Header:
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return _cached_header(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _cached_header(path_s: str, size: int, mtime_ns: int) -> Header:
    """One file's header, read once per file version (path, size, mtime)."""
    return read_header(Path(path_s))


def info_from_fields(
    fields: dict[str, Any], array_lengths: dict[str, int] | None = None, weights_bytes: int = 0, shards: int = 1
) -> ModelInfo:
    """The shape facts of a model from its metadata keys (pure: tests pass dicts)."""
    arch = str(fields["general.architecture"])

    def key(name: str, default: Any = None) -> Any:
        return fields.get(f"{arch}.{name}", default)

    n_layer = int(key("block_count"))
    n_embd = int(key("embedding_length"))
    heads = _per_layer(key("attention.head_count", 0), n_layer)
    head_kv = _per_layer(key("attention.head_count_kv", heads), n_layer)
    n_head = max(heads, default=0)
    default_head = n_embd // n_head if n_head else 0
    lengths = array_lengths or {}
    if arch in NO_KV_CACHE_ARCHS:
        head_kv = (0,) * n_layer
    recurrent = _recurrent_layers(arch, fields, head_kv)
    n_swa, swa = _swa_layers(arch, fields, n_layer)
    return ModelInfo(
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        head_kv=tuple(0 if r else h for h, r in zip(head_kv, recurrent, strict=True)),
        head_k=int(key("attention.key_length", default_head)),
        head_v=int(key("attention.value_length", default_head)),
        n_ff=_ffn_width(key),
        n_ctx_train=int(key("context_length", 0)),
        n_vocab=int(key("vocab_size", 0) or lengths.get("tokenizer.ggml.tokens", 0)),
        n_swa=n_swa,
        swa_layers=swa,
        recurrent_layers=recurrent,
        recurrent_state_floats=_recurrent_state_floats(key) if any(recurrent) else 0,
        weights_bytes=weights_bytes,
        shards=shards,
    )


def _per_layer(value: Any, n_layer: int) -> tuple[int, ...]:
    """A per-layer key: one number for every layer, or one per layer."""
    if isinstance(value, (list, tuple)):
        vals = [int(v) for v in value][:n_layer]
        return tuple(vals + [vals[-1] if vals else 0] * (n_layer - len(vals)))
    return (int(value),) * n_layer


def _ints(value: Any) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list) else [int(value or 0)]


def _ffn_width(key: Callable[..., Any]) -> int:
    """Dense FFN width, or for MoE the active experts' (plus shared experts') width."""
    dense = max(_ints(key("feed_forward_length", 0)))
    expert_ff = max(_ints(key("expert_feed_forward_length", 0)))
    if not expert_ff:
        return dense
    used = int(key("expert_used_count", 0) or 0)
    shared = int(key("expert_shared_feed_forward_length", 0) or 0) * max(int(key("expert_shared_count", 1) or 1), 1)
    return max(dense, expert_ff * used + shared)


# Encoders and diffusion models: llama.cpp creates no KV cache for them (``llama_model::create_memory``).
NO_KV_CACHE_ARCHS = frozenset(
    {
        *("bert", "modern-bert", "nomic-bert", "nomic-bert-moe", "neo-bert", "jina-bert-v2", "jina-bert-v3"),
        *("eurobert", "gemma-embedding", "wavtokenizer-dec", "dream", "llada", "llada-moe", "rnd1", "clef"),
    }
)

# Architectures whose recurrent layers are every layer but each N-th (llama.cpp default N = 4).
_FULL_ATTENTION_INTERVAL = frozenset({"qwen3next", "qwen35", "qwen35moe", "qwen4exp", "minimax-01"})


def _recurrent_layers(arch: str, fields: dict[str, Any], head_kv: tuple[int, ...]) -> tuple[bool, ...]:
    n = len(head_kv)
    flags = fields.get(f"{arch}.attention.recurrent_layers")
    if isinstance(flags, list):
        return tuple(bool(f) for f in flags[:n]) + (False,) * max(0, n - len(flags))
    if arch in _FULL_ATTENTION_INTERVAL:
        every = int(fields.get(f"{arch}.full_attention_interval", 4) or 4)
        return tuple((i + 1) % every != 0 for i in range(n))
    if any(k.startswith(f"{arch}.ssm.") for k in fields) or f"{arch}.wkv.head_size" in fields:
        return tuple(h == 0 for h in head_kv)
    return (False,) * n


def _recurrent_state_floats(key: Callable[..., Any]) -> int:
    """Mamba-style conv + ssm state per layer and sequence (``llama_hparams::n_embd_r/n_embd_s``)."""
    d_conv = int(key("ssm.conv_kernel", 0) or 0)
    d_inner = int(key("ssm.inner_size", 0) or 0)
    d_state = int(key("ssm.state_size", 0) or 0)
    groups = int(key("ssm.group_count", 0) or 0)
    conv = max(d_conv - 1, 0) * (d_inner + 2 * groups * d_state)
    return conv + d_state * d_inner


# Sliding-window architectures of this llama.cpp: (default pattern, dense layer first,
# window used when the header gives none, or None when the header must give one).
# From each ``src/models/<arch>.cpp``: ``load_swa_pattern(ml, N[, dense_first])``.
_SWA_ARCHS: dict[str, tuple[int, bool, int | None]] = {
    "gemma2": (2, False, 4096),
    "gemma3": (6, False, None),
    "gemma3n": (5, False, None),
    "gemma-embedding": (6, False, None),
    "cohere2": (4, False, None),
    "cohere2moe": (4, True, None),
    "gpt-oss": (2, False, None),
    "llama4": (4, False, 8192),  # chunked attention, 3 chunked : 1 full
    "exaone4": (4, False, None),
    "exaone-moe": (4, False, None),
    "olmo2": (4, False, None),
    "afmoe": (4, False, None),
    "mellum": (4, False, None),
    "plamo3": (8, False, None),
    "smallthinker": (4, True, None),
    "laguna": (4, True, None),
}


def _swa_layers(arch: str, fields: dict[str, Any], n_layer: int) -> tuple[int, tuple[bool, ...]]:
    """(window, which layers use it), as ``llama_hparams::set_swa_pattern`` decides."""
    none = (0, (False,) * n_layer)
    if arch not in _SWA_ARCHS or arch in NO_KV_CACHE_ARCHS:
        return none
    n_pattern, dense_first, default_window = _SWA_ARCHS[arch]
    window = fields.get(f"{arch}.attention.sliding_window", default_window)
    if not window:
        return none
    pattern = fields.get(f"{arch}.attention.sliding_window_pattern", n_pattern)
    if isinstance(pattern, list):
        flags = tuple(bool(p) for p in pattern[:n_layer])
        return int(window), flags + (False,) * (n_layer - len(flags))
    n = int(pattern)
    if dense_first:
        return int(window), tuple(n == 0 or i % n != 0 for i in range(n_layer))
    return int(window), tuple(n == 0 or i % n < n - 1 for i in range(n_layer))
