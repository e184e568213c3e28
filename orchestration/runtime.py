"""Starting (or joining) Ray the way every raylm command needs it."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_EXTENSIONS_DIR = str(Path.home() / ".cache" / "raylm" / "torch_extensions")


def init_ray(address: str | None = None) -> None:
    """Join the Ray cluster at ``address`` (or RAY_ADDRESS), else start a local one.

    The environment is set before Ray starts so its processes inherit it: a local Ray binds only to
    127.0.0.1 and DeepSpeed's JIT-built CPU ops are cached in one place across runs. Ray Train's
    controller keeps its default poll interval (the loop reports only at evaluations and checkpoints).
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", DEFAULT_EXTENSIONS_DIR)
    import ray

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS"))
