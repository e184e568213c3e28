"""Starting (or joining) Ray the way every raylm command needs it."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

EXTENSIONS_CACHE = Path.home() / ".cache" / "raylm" / "torch_extensions"
RAY_DATA_LOGGING_CONFIG = Path(__file__).with_name("ray_data_logging.yaml")
VERBOSE_ENV = "RAYLM_VERBOSE"  # "1": forward worker logs and Ray's INFO lines to the console (raylm -v)
# "0" (read by Ray once, when `ray` is imported): a Ray started here takes 127.0.0.1 as its node address
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# gloo listens on the address of this interface (default: of the hostname, which may be the LAN's)
GLOO_INTERFACE_ENV = "GLOO_SOCKET_IFNAME"


def extensions_dir() -> str:
    """Where DeepSpeed's JIT-built CPU ops are cached (TORCH_EXTENSIONS_DIR, unless set): one directory
    per ``ninja`` version. torch builds with whichever ninja is first on PATH, and ninja 1.12 changed
    the command hashes in its build log, so two ninjas sharing a directory (a venv's and the system's:
    a Ray Job's PATH against a shell's) rebuild each other's op at every launch, 30-50 s on 2 cores."""
    import shutil
    import subprocess

    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    ninja = shutil.which("ninja")
    if ninja is None:  # DeepSpeed says so itself when it needs one
        return str(EXTENSIONS_CACHE)
    version = subprocess.run([ninja, "--version"], capture_output=True, text=True).stdout.strip()
    return str(EXTENSIONS_CACHE / f"ninja-{version.replace('/', '_') or 'unknown'}")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def starts_local_ray(address: str | None = None) -> bool:
    """Whether ``ray.init`` will start a Ray of this command's own rather than join the cluster at
    ``address`` (else RAY_ADDRESS)."""
    return (address or os.environ.get("RAY_ADDRESS", "")) in ("", "local")


def keep_local_ray_on_loopback() -> None:
    """Make a Ray this process starts listen on loopback only; call it before anything imports ``ray``.

    Ray picks a local node's address once, at import (``ray_constants.ENABLE_RAY_CLUSTER``): with
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 it is 127.0.0.1, otherwise (Linux's default) the machine's
    outward address, and Ray 2.60 binds its GCS, raylet, object manager, core workers, dashboard agent
    and runtime-env agent to the node address. Training workers' gloo connections go over the
    loopback interface too. Every Ray process inherits both variables. Nothing changes when the
    command joins a cluster (RAY_ADDRESS): its nodes must reach each other.
    """
    if starts_local_ray():
        os.environ.setdefault(LOOPBACK_ENV, "0")
        os.environ.setdefault(GLOO_INTERFACE_ENV, loopback_interface())


def loopback_interface() -> str:
    """The name of this machine's loopback interface."""
    return "lo0" if sys.platform == "darwin" else "lo"


def check_loopback_in_time() -> None:
    """Refuse to start a local Ray that would listen on every interface because ``ray`` was imported
    before ``keep_local_ray_on_loopback`` (a script or notebook importing raylm's modules first)."""
    from ray._private import ray_constants

    wanted = os.environ.get(LOOPBACK_ENV, "").lower() not in ("1", "true")
    if wanted and ray_constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError(
            f"ray was imported before {LOOPBACK_ENV}=0 was set, so the Ray this command would start "
            "would listen on every network interface: set it in the environment (or call "
            "orchestration.runtime.keep_local_ray_on_loopback()) before importing ray or raylm's "
            "modules, as the raylm CLI does; or start Ray yourself with ray.init()"
        )


def init_ray(address: str | None = None) -> None:
    """Join the Ray cluster at ``address`` (or RAY_ADDRESS), else start a local one on loopback only.

    The environment is set before Ray starts so its processes inherit it: DeepSpeed's JIT-built CPU
    ops are cached in one place across runs. Ray Train's controller keeps its default poll interval
    (the loop reports only at evaluations and checkpoints).

    The console shows raylm's own lines: the driver prints progress from metrics.jsonl, so worker
    stdout and Ray's INFO/deprecation chatter stay in Ray's session logs unless ``RAYLM_VERBOSE=1``.
    """
    os.environ["TORCH_EXTENSIONS_DIR"] = extensions_dir()
    import ray

    if ray.is_initialized():
        return
    if starts_local_ray(address):
        keep_local_ray_on_loopback()  # a caller other than the CLI: in time for gloo, maybe not for Ray
        check_loopback_in_time()
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
