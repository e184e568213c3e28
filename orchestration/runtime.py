"""Starting (or joining) Ray the way every raylm command needs it."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

DEFAULT_EXTENSIONS_DIR = str(Path.home() / ".cache" / "raylm" / "torch_extensions")
RAY_DATA_LOGGING_CONFIG = Path(__file__).with_name("ray_data_logging.yaml")
VERBOSE_ENV = "RAYLM_VERBOSE"  # "1": forward worker logs and Ray's INFO lines to the console (raylm -v)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def init_ray(address: str | None = None) -> None:
    """Join the Ray cluster at ``address`` (or RAY_ADDRESS), else start a local one.

    The environment is set before Ray starts so its processes inherit it: a local Ray binds only to
    127.0.0.1 and DeepSpeed's JIT-built CPU ops are cached in one place across runs. Ray Train's
    controller keeps its default poll interval (the loop reports only at evaluations and checkpoints).

    The console shows raylm's own lines: the driver prints progress from metrics.jsonl, so worker
    stdout and Ray's INFO/deprecation chatter stay in Ray's session logs unless ``RAYLM_VERBOSE=1``.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", DEFAULT_EXTENSIONS_DIR)
    import ray

    if ray.is_initialized():
        return
    loud = verbose()
    if not loud:
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        logging.getLogger("ray").setLevel(logging.WARNING)
        # the notice that a local cluster uses token authentication, printed on every start
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # Ray Data reconfigures its loggers at each execution from this file: console at WARNING
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(RAY_DATA_LOGGING_CONFIG))
    ray.init(
        address=address or os.environ.get("RAY_ADDRESS"),
        log_to_driver=loud,
        logging_level=logging.INFO if loud else logging.WARNING,
    )


def joined_cluster() -> bool:
    """Whether this driver joined a Ray cluster (RAY_ADDRESS, a Ray job), whose autoscaler may add
    nodes, rather than starting a Ray of its own, to which nothing can add any. False inside a Ray
    worker (a Tune trial): the sweep's driver decided for its trials."""
    from ray._private import worker

    node = worker._global_node
    return worker.global_worker.mode == worker.SCRIPT_MODE and node is not None and not node.is_head()


def cluster_capacity() -> tuple[dict, dict | None]:
    """(resources the cluster has now, the most its node types allow where the cluster publishes them:
    KubeRay does, ``ray up`` clusters do not: None)."""
    import ray
    from ray._private.state import state as ray_state  # what Ray Train's own pre-check reads

    return ray.cluster_resources(), ray_state.get_max_resources_from_cluster_config()
