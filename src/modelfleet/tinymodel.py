"""Tiny random-weight llama GGUF models for tests.

A real ``llama-server`` loads these in milliseconds, so tests can exercise the
whole process lifecycle (spawn, ``/health``, chat completions, shutdown) without
downloading anything. The output is gibberish by construction.

The file is a plain ``llama``-architecture GGUF:

* random weights (normal, std 0.02; RMS-norm weights are ones), F32 by default or
  F16 for the 2-D matrices with ``f16=True`` (norms stay F32, as llama.cpp wants);
* a byte-level SentencePiece (``tokenizer.ggml.model = "llama"``) vocabulary of
  259 tokens laid out like Llama 2's: ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2,
  then the byte tokens ``<0x00>`` .. ``<0xFF>`` (ids 3 .. 258). Any UTF-8 text
  tokenizes to its bytes, so no merges are needed. ``add_space_prefix`` is off so
  a prompt maps to exactly ``[<s>] + bytes``;
* a ChatML Jinja template in ``tokenizer.chat_template`` so
  ``/v1/chat/completions`` works. ``<|im_start|>`` / ``<|im_end|>`` are not
  vocabulary entries; they are simply tokenized as bytes.

With ``printable=True`` (the default) one embedding channel is used as a
constant bias that the output head reads, so the model only ever samples
printable ASCII bytes (``' '`` .. ``'~'``): replies are readable text instead of
U+FFFD soup, and ``</s>`` is never produced, so every request generates exactly
``n_predict`` / ``max_tokens`` tokens. ``printable=False`` gives plain random
weights (any byte, and an occasional early ``</s>``).

With ``TinyShape(arch="gemma3", sliding_window=N)`` the file is a ``gemma3`` model
instead (the same tensors plus gemma3's Q/K norms and post-norms), whose layers
follow llama.cpp's gemma3 pattern: five sliding-window layers, then one full layer.
llama-server then builds a separate, smaller KV cache for the sliding-window layers,
which is what the memory tests need. Its replies are gibberish too.

Generation is a pure function of the arguments: the same ``(shape, seed, name,
f16, printable)`` produce a byte-identical file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import numpy.typing as npt

__all__ = [
    "BOS_ID",
    "CHATML_TEMPLATE",
    "EOS_ID",
    "TINY_VOCAB",
    "TINY_VOCAB_SIZE",
    "UNK_ID",
    "TinyShape",
    "write_tiny_llama",
]

UNK_ID = 0
BOS_ID = 1
EOS_ID = 2
_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")

TINY_VOCAB: tuple[str, ...] = _SPECIAL_TOKENS + tuple(f"<0x{b:02X}>" for b in range(256))
TINY_VOCAB_SIZE = len(TINY_VOCAB)  # 259

# True for the byte tokens of printable ASCII (space .. '~').
_PRINTABLE_MASK = np.array([False] * len(_SPECIAL_TOKENS) + [0x20 <= b <= 0x7E for b in range(256)])

# Plain ChatML, as used by Qwen/SmolLM. Works with llama-server's Jinja engine
# (the default) and is also recognised by its built-in template detection.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_RMS_EPS = 1e-5
_ROPE_FREQ_BASE = 10000.0
_INIT_STD = 0.02


@dataclass(frozen=True)
class TinyShape:
    """Hyper-parameters of a tiny llama model.

    ``n_head_kv < n_head`` gives a grouped-query-attention model; ``head_dim``
    overrides the per-head size (default ``n_embd // n_head``). ``arch="gemma3"``
    with ``sliding_window`` gives a sliding-window model (see the module docstring).
    """

    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 4
    n_ff: int = 128
    n_ctx_train: int = 2048
    head_dim: int | None = None
    arch: Literal["llama", "gemma3"] = "llama"
    sliding_window: int | None = None

    @property
    def head_size(self) -> int:
        """The effective per-head dimension."""
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    def validate(self) -> None:
        """Raise ``ValueError`` if llama.cpp would reject (or mis-handle) this shape."""
        for field in ("n_layer", "n_embd", "n_head", "n_head_kv", "n_ff", "n_ctx_train"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TinyShape.{field} must be a positive int, got {value!r}")
        if self.head_dim is None and self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) unless head_dim is set"
            )
        if self.head_dim is not None and (
            not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool) or self.head_dim <= 0
        ):
            raise ValueError(f"TinyShape.head_dim must be a positive int or None, got {self.head_dim!r}")
        if self.head_size % 2 != 0:
            raise ValueError(f"head size must be even for RoPE, got {self.head_size}")
        if self.n_head % self.n_head_kv != 0:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_head_kv ({self.n_head_kv})")
        if self.arch not in ("llama", "gemma3"):
            raise ValueError(f"TinyShape.arch must be 'llama' or 'gemma3', got {self.arch!r}")
        if self.sliding_window is not None and (self.arch != "gemma3" or self.sliding_window <= 0):
            raise ValueError("TinyShape.sliding_window must be a positive int, and needs arch='gemma3'")


def _tensors(
    shape: TinyShape, rng: np.random.Generator, *, f16: bool, printable: bool
) -> list[tuple[str, npt.NDArray[Any]]]:
    """The llama tensor set, in llama.cpp's order.

    numpy shapes are ``(rows, cols)`` = ``(out, in)``; GGUF stores dimensions
    reversed, so ``(n_vocab, n_embd)`` becomes llama.cpp's ``{n_embd, n_vocab}``.
    """
    mat_dtype = np.float16 if f16 else np.float32
    n_q = shape.n_head * shape.head_size
    n_kv = shape.n_head_kv * shape.head_size

    def mat(rows: int, cols: int) -> npt.NDArray[Any]:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * _INIT_STD).astype(mat_dtype)

    def ones(n: int) -> npt.NDArray[Any]:
        return np.ones(n, dtype=np.float32)

    token_embd = mat(TINY_VOCAB_SIZE, shape.n_embd)
    if printable:
        # Channel 0 of every embedding is a constant "bias" channel. The random
        # blocks only add noise of order 0.03 to it, so after the final RMS norm
        # it dominates the hidden state (~ +sqrt(n_embd)) for every position.
        token_embd[:, 0] = 1.0
    out: list[tuple[str, npt.NDArray[Any]]] = [("token_embd.weight", token_embd)]
    for i in range(shape.n_layer):
        p = f"blk.{i}."
        out += [
            (p + "attn_norm.weight", ones(shape.n_embd)),
            (p + "attn_q.weight", mat(n_q, shape.n_embd)),
            (p + "attn_k.weight", mat(n_kv, shape.n_embd)),
            (p + "attn_v.weight", mat(n_kv, shape.n_embd)),
            (p + "attn_output.weight", mat(shape.n_embd, n_q)),
            (p + "ffn_norm.weight", ones(shape.n_embd)),
            (p + "ffn_gate.weight", mat(shape.n_ff, shape.n_embd)),
            (p + "ffn_down.weight", mat(shape.n_embd, shape.n_ff)),
            (p + "ffn_up.weight", mat(shape.n_ff, shape.n_embd)),
        ]
        if shape.arch == "gemma3":
            out += [
                (p + "attn_q_norm.weight", ones(shape.head_size)),
                (p + "attn_k_norm.weight", ones(shape.head_size)),
                (p + "post_attention_norm.weight", ones(shape.n_embd)),
                (p + "post_ffw_norm.weight", ones(shape.n_embd)),
            ]
    output = mat(TINY_VOCAB_SIZE, shape.n_embd)
    if printable:
        # Read the bias channel: printable ASCII gets a logit of about
        # +sqrt(n_embd), everything else (control tokens, </s>, other bytes)
        # about -sqrt(n_embd). The samplers' min_p/top_k cut-offs then never pick
        # a non-printable token, so replies are readable and always run to
        # n_predict / max_tokens.
        output[:, 0] = np.where(_PRINTABLE_MASK, 1.0, -1.0)
    out += [
        ("output_norm.weight", ones(shape.n_embd)),
        ("output.weight", output),
    ]
    return out


def _add_metadata(writer: Any, shape: TinyShape, name: str, f16: bool) -> None:
    writer.add_name(name)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32))

    writer.add_vocab_size(TINY_VOCAB_SIZE)
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_layer_norm_rms_eps(_RMS_EPS)
    writer.add_rope_freq_base(_ROPE_FREQ_BASE)
    # llama.cpp requires n_rot == head size for the llama architecture.
    writer.add_rope_dimension_count(shape.head_size)
    if shape.head_dim is not None:
        writer.add_key_length(shape.head_size)
        writer.add_value_length(shape.head_size)
    if shape.sliding_window is not None:
        writer.add_sliding_window(shape.sliding_window)

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(TINY_VOCAB))
    writer.add_token_scores([0.0] * TINY_VOCAB_SIZE)
    writer.add_token_types(
        [
            int(gguf.TokenType.UNKNOWN),
            int(gguf.TokenType.CONTROL),
            int(gguf.TokenType.CONTROL),
        ]
        + [int(gguf.TokenType.BYTE)] * 256
    )
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(CHATML_TEMPLATE)


def write_tiny_llama(
    path: str | os.PathLike[str],
    shape: TinyShape = TinyShape(),
    *,
    seed: int = 0,
    name: str = "tiny",
    f16: bool = False,
    printable: bool = True,
) -> Path:
    """Write a tiny random-weight llama GGUF to ``path`` atomically and return its path.

    ``f16`` stores the matrices as F16 (about half the size); ``printable`` biases
    the output head to printable ASCII so generation never stops early (see the
    module docstring).

    The file is written to a temporary file in the same directory and renamed
    into place, so a concurrent reader never sees a partial model. Parent
    directories are created. The result depends only on the arguments.
    """
    shape.validate()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, arch=shape.arch)
        try:
            _add_metadata(writer, shape, name, f16)
            for tensor_name, data in _tensors(shape, rng, f16=f16, printable=printable):
                writer.add_tensor(tensor_name, data)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        tmp.chmod(0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return target
