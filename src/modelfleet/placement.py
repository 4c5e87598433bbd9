"""Which launcher runs a stack's instances, from its ``placement:``: the one place it is chosen."""

from __future__ import annotations

from modelfleet.config import StackConfig
from modelfleet.errors import ConfigError
from modelfleet.launcher import Launcher, LocalLauncher


def launcher_for(cfg: StackConfig) -> Launcher:
    """A LocalLauncher for ``placement: local`` (the default), a RayLauncher for ``placement: ray``."""
    if cfg.placement.kind == "local":
        return LocalLauncher()
    try:
        from modelfleet.ray_launcher import RayLauncher
    except ImportError as exc:
        raise ConfigError(
            f"placement.kind: 'ray' needs Ray, which is not installed ({exc}); "
            "install it with `pip install 'modelfleet[ray]'`"
        ) from exc
    return RayLauncher(cfg)
