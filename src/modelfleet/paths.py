"""Where the installed parts live: the per-user cache, the llama-server build in it, the dev model.

Kept apart from :mod:`~modelfleet.provision` (which downloads and builds them) so that
reading a config or finding a binary never imports the installer.
"""

from __future__ import annotations

import os
from pathlib import Path

LLAMA_CPP_VERSION = "11434.0.0"
# Bumped whenever the build recipe changes, so a binary built the old way is not reused.
BUILD_RECIPE = "cpu2"
DEV_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """The per-user cache: ``$MODELFLEET_CACHE_DIR`` or ``~/.cache/modelfleet``."""
    env = os.environ.get("MODELFLEET_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "modelfleet"


def cached_llama_server() -> Path:
    """Where the built binary lives (it may not exist yet)."""
    return cache_dir() / f"llama.cpp-{LLAMA_CPP_VERSION}-{BUILD_RECIPE}" / "bin" / "llama-server"


def cached_dev_model() -> Path:
    """Where the dev model lives (it may not exist yet)."""
    return cache_dir() / "models" / DEV_MODEL_NAME
