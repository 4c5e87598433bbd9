"""Tests for the tiny random-weight GGUF generator, including a real llama-server run."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import httpx
import pytest

from modelfleet.tinymodel import (
    BOS_ID,
    CHATML_TEMPLATE,
    EOS_ID,
    TINY_VOCAB_SIZE,
    UNK_ID,
    TinyShape,
    write_tiny_llama,
)

LOAD_TIMEOUT_S = 60.0
REQUEST_TIMEOUT = httpx.Timeout(30.0, connect=2.0)


def _field(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    assert field is not None, f"missing GGUF key {key}"
    return field.contents()


# --------------------------------------------------------------------------- metadata


def test_metadata_round_trip(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    assert path == tmp_path / "tiny.gguf"
    assert path.stat().st_size < 1_000_000
    # no temp files left behind by the atomic write
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]

    r = gguf.GGUFReader(path)
    shape = TinyShape()
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "general.name") == "tiny"
    assert _field(r, "llama.block_count") == shape.n_layer
    assert _field(r, "llama.embedding_length") == shape.n_embd
    assert _field(r, "llama.attention.head_count") == shape.n_head
    assert _field(r, "llama.attention.head_count_kv") == shape.n_head_kv
    assert _field(r, "llama.feed_forward_length") == shape.n_ff
    assert _field(r, "llama.context_length") == shape.n_ctx_train
    assert _field(r, "llama.rope.dimension_count") == shape.n_embd // shape.n_head
    assert _field(r, "llama.vocab_size") == TINY_VOCAB_SIZE == 259

    tokens = _field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == 259
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert tokens[3] == "<0x00>" and tokens[3 + 0x0A] == "<0x0A>" and tokens[-1] == "<0xFF>"
    assert len(_field(r, "tokenizer.ggml.scores")) == 259
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert set(types[3:]) == {gguf.TokenType.BYTE}
    assert _field(r, "tokenizer.ggml.model") == "llama"
    assert _field(r, "tokenizer.ggml.unknown_token_id") == UNK_ID
    assert _field(r, "tokenizer.ggml.bos_token_id") == BOS_ID
    assert _field(r, "tokenizer.ggml.eos_token_id") == EOS_ID
    assert _field(r, "tokenizer.chat_template") == CHATML_TEMPLATE

    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 3 + 9 * shape.n_layer
    # GGUF (ggml) dimension order: {n_embd, n_vocab}
    assert list(tensors["token_embd.weight"].shape) == [shape.n_embd, 259]
    assert list(tensors["blk.1.ffn_down.weight"].shape) == [shape.n_ff, shape.n_embd]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in r.tensors)


def test_gqa_shape_writes_head_count_kv(tmp_path: Path) -> None:
    shape = TinyShape(n_head=8, n_head_kv=2, n_embd=64)
    r = gguf.GGUFReader(write_tiny_llama(tmp_path / "gqa.gguf", shape))
    assert _field(r, "llama.attention.head_count") == 8
    assert _field(r, "llama.attention.head_count_kv") == 2
    tensors = {t.name: t for t in r.tensors}
    # K/V project to n_head_kv * head_dim = 2 * 8
    assert list(tensors["blk.0.attn_k.weight"].shape) == [64, 16]
    assert list(tensors["blk.0.attn_v.weight"].shape) == [64, 16]
    assert list(tensors["blk.0.attn_q.weight"].shape) == [64, 64]


def test_explicit_head_dim_sets_key_and_value_length(tmp_path: Path) -> None:
    shape = TinyShape(n_embd=64, n_head=4, head_dim=32)
    r = gguf.GGUFReader(write_tiny_llama(tmp_path / "hd.gguf", shape))
    assert _field(r, "llama.attention.key_length") == 32
    assert _field(r, "llama.attention.value_length") == 32
    assert _field(r, "llama.rope.dimension_count") == 32
    tensors = {t.name: t for t in r.tensors}
    assert list(tensors["blk.0.attn_q.weight"].shape) == [64, 128]
    assert list(tensors["blk.0.attn_output.weight"].shape) == [128, 64]


def test_deterministic_per_seed(tmp_path: Path) -> None:
    a = write_tiny_llama(tmp_path / "a.gguf", seed=7).read_bytes()
    b = write_tiny_llama(tmp_path / "b.gguf", seed=7).read_bytes()
    c = write_tiny_llama(tmp_path / "c.gguf", seed=8).read_bytes()
    assert a == b
    assert a != c
    assert len(a) == len(c)


def test_f16_is_smaller_and_typed(tmp_path: Path) -> None:
    f32 = write_tiny_llama(tmp_path / "f32.gguf")
    f16 = write_tiny_llama(tmp_path / "f16.gguf", f16=True)
    assert f16.stat().st_size < f32.stat().st_size
    r = gguf.GGUFReader(f16)
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert _field(r, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_F16)


def test_overwrites_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "m.gguf"
    write_tiny_llama(target, seed=1)
    first = target.read_bytes()
    write_tiny_llama(target, seed=2)
    assert target.read_bytes() != first
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.gguf"]


@pytest.mark.parametrize(
    "shape",
    [
        TinyShape(n_head=4, n_head_kv=3),
        TinyShape(n_embd=60, n_head=8),
        TinyShape(n_layer=0),
        TinyShape(n_embd=12, n_head=4),  # head size 3 is odd
    ],
)
def test_invalid_shapes_rejected(tmp_path: Path, shape: TinyShape) -> None:
    with pytest.raises(ValueError):
        write_tiny_llama(tmp_path / "bad.gguf", shape)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- real llama-server


def _find_llama_server() -> Path | None:
    env = os.environ.get("MODELFLEET_LLAMA_SERVER")
    if env:
        return Path(env)
    candidates: list[Path] = []
    try:
        from modelfleet.provision import cached_llama_server

        candidates.append(cached_llama_server())
    except Exception:  # provision is optional for this test
        pass
    candidates.append(Path.home() / ".cache" / "modelfleet" / "llama.cpp-11434.0.0" / "bin" / "llama-server")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class RunningServer:
    base_url: str
    proc: subprocess.Popen[bytes]
    log: Path
    load_seconds: float


def _log_tail(log: Path, n: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "<no log>"


@contextlib.contextmanager
def _serve(binary: Path, model: Path, workdir: Path) -> Iterator[RunningServer]:
    """Run llama-server on ``model`` until healthy; always terminate and reap it."""
    port = _free_port()
    log = workdir / f"llama-server-{model.stem}.log"
    argv = [
        str(binary),
        "-m",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-c",
        "256",
        "-np",
        "2",
        "--threads",
        "1",
    ]
    base_url = f"http://127.0.0.1:{port}"
    with log.open("wb") as log_fh:
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=subprocess.STDOUT)
    try:
        deadline = started + LOAD_TIMEOUT_S
        ready = False
        with httpx.Client(timeout=httpx.Timeout(2.0)) as client:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    pytest.fail(f"llama-server exited with {proc.returncode}:\n{_log_tail(log)}")
                try:
                    resp = client.get(f"{base_url}/health")
                    if resp.status_code == 200 and resp.json().get("status") == "ok":
                        ready = True
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        if not ready:
            pytest.fail(f"llama-server not healthy after {LOAD_TIMEOUT_S}s:\n{_log_tail(log)}")
        yield RunningServer(base_url, proc, log, time.monotonic() - started)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


@pytest.fixture
def server_binary() -> Path:
    binary = _find_llama_server()
    if binary is None:
        pytest.skip("no llama-server binary (set MODELFLEET_LLAMA_SERVER or run provisioning)")
    return binary


@pytest.fixture
def llama_server(server_binary: Path, tmp_path: Path) -> Iterator[RunningServer]:
    with _serve(server_binary, write_tiny_llama(tmp_path / "tiny.gguf"), tmp_path) as server:
        yield server


def _is_printable_ascii(text: str) -> bool:
    return all(" " <= ch <= "~" for ch in text)


def test_llama_server_loads_and_answers(llama_server: RunningServer) -> None:
    print(f"tiny model healthy after {llama_server.load_seconds:.3f}s")
    with httpx.Client(base_url=llama_server.base_url, timeout=REQUEST_TIMEOUT) as client:
        resp = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
        )
        assert resp.status_code == 200, resp.text
        body = resp.json()
        message = body["choices"][0]["message"]
        assert message["role"] == "assistant"
        assert isinstance(message["content"], str)
        assert body["usage"]["completion_tokens"] >= 1
        # printable=True: never </s>, only printable ASCII, so exactly max_tokens bytes
        assert body["usage"]["completion_tokens"] == 8
        assert body["choices"][0]["finish_reason"] == "length"
        assert len(message["content"]) == 8 and _is_printable_ascii(message["content"]), message

        resp = client.post("/completion", json={"prompt": "hello", "n_predict": 8})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert "timings" in body
        assert body["timings"]["predicted_n"] == 8
        # byte-level vocab: <s> + 5 bytes, no space prefix
        assert body["tokens_evaluated"] == 6, body
        assert _is_printable_ascii(body["content"]), body["content"]

    assert llama_server.proc.poll() is None, _log_tail(llama_server.log)


@pytest.mark.parametrize(
    ("shape", "f16", "printable"),
    [
        (TinyShape(n_head=8, n_head_kv=2), False, True),
        (TinyShape(n_head=4, n_head_kv=2, head_dim=32), True, True),
        (TinyShape(), False, False),
    ],
    ids=["gqa", "head_dim-f16", "raw-weights"],
)
def test_llama_server_loads_variants(
    server_binary: Path, tmp_path: Path, shape: TinyShape, f16: bool, printable: bool
) -> None:
    model = write_tiny_llama(tmp_path / "variant.gguf", shape, f16=f16, printable=printable, seed=3)
    with (
        _serve(server_binary, model, tmp_path) as server,
        httpx.Client(base_url=server.base_url, timeout=REQUEST_TIMEOUT) as client,
    ):
        resp = client.post("/completion", json={"prompt": "hi", "n_predict": 16, "seed": 1})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["timings"]["predicted_n"] >= 1
        if printable:
            assert body["timings"]["predicted_n"] == 16
            assert _is_printable_ascii(body["content"]), body["content"]
