"""Run any raylm command on a Ray cluster as a Ray Job (``raylm submit``).

The job's entrypoint is ``python -m orchestration <command> ...`` run on the head node with this
repository uploaded as the runtime_env ``working_dir``, so the cluster runs the code you have here.
The Jobs API is the dashboard port (8265), which must never face the internet: reach it through
an SSH tunnel (``ray dashboard cluster.yaml``) or ``kubectl port-forward`` and submit to
``http://127.0.0.1:8265``. Ray 2.60 clusters use token authentication; the token is read the way
Ray reads it (``RAY_AUTH_TOKEN``, the file in ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``) and
sent as a header, never printed, and never over plain HTTP to another machine unless the user says
so (``--allow-insecure-token``): loopback (a tunnel's end) and https:// are the safe transports.

The equivalent with Ray's own CLI (the token is picked up from the same places):

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        -- python -m orchestration train --config configs/shakespeare.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping, Optional, TextIO
from urllib.parse import urlparse

DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # the local end of the SSH tunnel / port-forward
TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
# Ray's Jobs API until the head's job agent has registered (seconds after `ray start`, longer on a busy head)
NO_AGENT, AGENT_WAIT_S = "No available agent to submit job", 60.0

# Never uploaded: environments, outputs, datasets and caches (gitignore syntax, anchored at the
# working dir so `data_pipeline/` is kept while the top-level `data/` is not). Ray also honours
# the repository's .gitignore.
DEFAULT_EXCLUDES = [
    "/.venv/",
    "/.git/",
    "/runs/",
    "/data/",
    "/build/",
    "/.gpu/",
    "/.ci/",
    "__pycache__/",
    "*.pyc",
    ".pytest_cache/",
    "*.egg-info/",
    ".cache/",
    ".ipynb_checkpoints/",
]

# Environment every job gets unless --env overrides it: unbuffered output so followed logs are live.
# Ray Train's health-check interval stays at Ray's default on a cluster (workers report only at eval
# and checkpoint steps, so its report latency costs little; fast polling would cost RPCs per worker).
DEFAULT_JOB_ENV = {"PYTHONUNBUFFERED": "1"}
# Only for a cluster on this machine: keeps every Ray socket and Ray Train's MASTER_ADDR on
# 127.0.0.1. On a multi-node cluster it would advertise an unreachable address, so never there.
LOOPBACK_JOB_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

TUNNEL_RECIPE = """\
  The Ray Jobs API runs any code it is sent: keep port 8265 private and tunnel to it instead:
    ray dashboard cluster.yaml                       # cluster-launcher clusters: forwards 127.0.0.1:8265
    ssh -N -L 8265:127.0.0.1:8265 ubuntu@HEAD_NODE   # any head node reachable over SSH
    kubectl port-forward svc/RAYCLUSTER-head-svc 8265:8265   # KubeRay
  then submit with --address http://127.0.0.1:8265"""


class InsecureTokenError(ValueError):
    """The cluster token would travel in the clear (plain HTTP to a non-loopback host) without consent."""


class JobFailedError(RuntimeError):
    """A job ended FAILED or STOPPED; the message holds its status, Ray's reason and its log tail."""

    def __init__(self, job_id: str, status: str, report: str):
        super().__init__(report)
        self.job_id, self.status = job_id, status


# --- connecting -------------------------------------------------------------------------------


def normalize_address(address: Optional[str]) -> str:
    """``address`` (or RAY_API_SERVER_ADDRESS / RAY_ADDRESS when it is an http URL), with a scheme."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or ""
    if not address:
        env = os.environ.get("RAY_ADDRESS", "")
        address = env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS
    if "://" not in address:
        address = "http://" + address
    return address.rstrip("/")


def is_loopback(address: str) -> bool:
    """True when the URL's host is this machine (127.0.0.0/8, ::1, localhost)."""
    host = urlparse(normalize_address(address)).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_insecure(address: str) -> bool:
    """True when the URL is plain HTTP to a host other than this machine (traffic readable on the way)."""
    url = normalize_address(address)
    return urlparse(url).scheme == "http" and not is_loopback(url)


def warn_if_insecure(address: str, stream: TextIO = sys.stderr) -> bool:
    """Warn (to ``stream``) when the Jobs API is reached over plain HTTP on a non-loopback host.

    Returns True when it warned. Anyone who can reach that port can run code on the cluster, and
    plain HTTP carries the job in the clear.
    """
    url = normalize_address(address)
    if not is_insecure(url):
        return False
    print(
        f"raylm submit: WARNING: {url} is plain HTTP to a non-loopback host; the auth token and the "
        f"job travel unencrypted and the port may be open to others.\n{TUNNEL_RECIPE}",
        file=stream,
    )
    return True


def auth_token() -> Optional[str]:
    """The cluster auth token from where Ray 2.60 looks for it, in its order, or None.

    RAY_AUTH_TOKEN, then the file named by RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token (the file
    `ray start` / `ray get-auth-token --generate` writes). Ray's own JobSubmissionClient sends it
    only when RAY_AUTH_MODE=token is set in the client's environment; raylm always sends it.
    """
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        token = Path(path).expanduser().read_text().strip() if Path(path).expanduser().is_file() else ""
        if not token:
            raise RuntimeError(f"RAY_AUTH_TOKEN_PATH={path} is not a readable file holding a token")
        return token
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        return default.read_text().strip() or None
    return None


def auth_headers(address: str, *, allow_insecure_token: bool = False) -> Optional[dict[str, str]]:
    """The Authorization header carrying the cluster token to ``address``, or None without a token.

    Raises InsecureTokenError rather than send the token over plain HTTP to a non-loopback host,
    unless ``allow_insecure_token`` (``--allow-insecure-token``): anyone on the path could read it
    and then run any code on the cluster.
    """
    token = auth_token()
    if token is None:
        return None
    url = normalize_address(address)
    if is_insecure(url) and not allow_insecure_token:
        raise InsecureTokenError(
            f"refusing to send the cluster auth token over plain HTTP to {url} (not this machine): anyone "
            "on the network path could read it and run code on the cluster. Use https://, or an SSH tunnel "
            f"and a loopback address, or pass --allow-insecure-token if this network is trusted.\n{TUNNEL_RECIPE}"
        )
    return {"Authorization": f"Bearer {token}"}


def connect(address: Optional[str] = None, *, allow_insecure_token: bool = False):
    """A ``JobSubmissionClient`` for ``address``, with the auth header when a token is available
    (``auth_headers``: refuses plain HTTP to another host unless ``allow_insecure_token``)."""
    from ray.job_submission import JobSubmissionClient

    url = normalize_address(address)
    headers = auth_headers(url, allow_insecure_token=allow_insecure_token)
    warn_if_insecure(url)
    return JobSubmissionClient(url, headers=headers)


# --- what a job runs --------------------------------------------------------------------------


def entrypoint(command_args: Iterable[str]) -> str:
    """The shell command the job runs: ``python -m orchestration <command_args>``, safely quoted."""
    args = list(command_args)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        raise ValueError("no raylm command to submit: pass one after '--', e.g. -- train --config configs/x.yaml")
    return shlex.join(["python", "-m", "orchestration", *args])


PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def pip_requirements(pyproject: Path = PYPROJECT) -> list[str]:
    """raylm's dependencies from pyproject.toml pinned to the versions installed here, minus Ray.

    The cluster already runs ray==2.60.0 (the runtime_env installs into a virtualenv layered on the
    cluster's Python; a second Ray there would not match the running cluster).
    """
    try:
        import tomllib
    except ImportError:  # Python 3.10: the installed package's metadata holds the same list
        from importlib.metadata import requires

        deps = [r for r in requires("raylm") or [] if "extra ==" not in r]
    else:
        deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return [_pin(d) for d in deps if _requirement_name(d) != "ray"]


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement.strip(), maxsplit=1)[0].lower()


def _pin(requirement: str) -> str:
    """``name==<the version installed here>`` (what was tested), else the requirement unchanged.

    A local build tag is dropped (torch 2.13.0+cpu -> torch==2.13.0), so a GPU node gets PyPI's
    CUDA build of the same version.
    """
    from importlib.metadata import PackageNotFoundError, version

    name = _requirement_name(requirement)
    try:
        return f"{name}=={version(name).split('+')[0]}"
    except PackageNotFoundError:
        return requirement


def parse_env(pairs: Iterable[str]) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` -> dict; raises ValueError naming a malformed pair."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not key.replace("_", "a").isalnum():
            raise ValueError(f"--env expects KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def runtime_env(
    address: str,
    *,
    env: Optional[Mapping[str, str]] = None,
    pip: Optional[list[str]] = None,
    working_dir: str = ".",
    excludes: Optional[list[str]] = None,
) -> dict:
    """The job's runtime_env: working_dir + excludes, env vars (defaults < ``env``), optional pip."""
    env_vars = {**DEFAULT_JOB_ENV, **(LOOPBACK_JOB_ENV if is_loopback(address) else {}), **(env or {})}
    renv = {
        "working_dir": str(Path(working_dir).resolve()),
        "excludes": list(DEFAULT_EXCLUDES if excludes is None else excludes),
        "env_vars": env_vars,
    }
    if pip:
        renv["pip"] = {"packages": list(pip), "pip_check": False}
    return renv


# --- the job lifecycle ------------------------------------------------------------------------


def submit(
    address: Optional[str],
    command_args: list[str],
    *,
    env: Optional[Mapping[str, str]] = None,
    follow: bool = False,
    wait: bool = False,
    pip: Optional[list[str]] = None,
    working_dir: str = ".",
    excludes: Optional[list[str]] = None,
    job_id: Optional[str] = None,
    out: TextIO = sys.stdout,
    allow_insecure_token: bool = False,
    client=None,
) -> str:
    """Submit ``python -m orchestration <command_args>`` as a Ray Job; returns the job id.

    ``pip``: packages to install for the job (``pip_requirements()`` gives raylm's pinned set);
    leave None on clusters whose setup commands installed raylm. ``follow`` streams the job's logs
    to ``out`` until it ends; ``wait`` waits silently. With either, a job that does not succeed
    raises JobFailedError carrying its status, Ray's reason and its log tail. ``allow_insecure_token``:
    see ``auth_headers``.
    """
    url = normalize_address(address)
    client = client or connect(url, allow_insecure_token=allow_insecure_token)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint(command_args),
                submission_id=job_id,
                runtime_env=runtime_env(url, env=env, pip=pip, working_dir=working_dir, excludes=excludes),
                metadata={"submitted_by": "raylm submit"},
            )
            break
        except RuntimeError as err:
            # A head that has just started answers the Jobs API before its job agent has registered
            if NO_AGENT not in str(err) or time.monotonic() > deadline:
                raise
            print(f"[raylm] {url} has no job agent yet (a head just started?): retrying", file=out, flush=True)
            time.sleep(1)
    print(f"[raylm] submitted {job_id} to {url}: {entrypoint(command_args)}", file=out, flush=True)
    if follow or wait:
        status = (
            follow_logs(url, job_id, out=out, client=client) if follow else wait_for_job(url, job_id, client=client)
        )
        if status != "SUCCEEDED":
            raise JobFailedError(job_id, status, failure_report(url, job_id, client=client))
        print(f"[raylm] {job_id} {status}", file=out, flush=True)
    return job_id


def job_status(address: Optional[str], job_id: str, *, client=None) -> str:
    """The job's status name: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
    return str((client or connect(address)).get_job_status(job_id).value)


def wait_for_job(
    address: Optional[str], job_id: str, *, timeout_s: Optional[float] = None, poll_s: float = 1.0, client=None
) -> str:
    """Poll until the job reaches a terminal status and return it; TimeoutError after ``timeout_s``."""
    client = client or connect(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while (status := job_status(address, job_id, client=client)) not in TERMINAL_STATUSES:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)
    return status


def follow_logs(address: Optional[str], job_id: str, *, out: TextIO = sys.stdout, client=None) -> str:
    """Stream the job's logs to ``out`` as they are written until it ends; returns its final status."""
    client = client or connect(address)

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(_tail())
    # The log stream closes as the job ends; its status may take a moment to be recorded.
    return wait_for_job(address, job_id, client=client, poll_s=0.2)


def job_logs(address: Optional[str], job_id: str, *, client=None) -> str:
    """Everything the job has logged so far."""
    return (client or connect(address)).get_job_logs(job_id)


def failure_report(address: Optional[str], job_id: str, *, lines: int = 40, client=None) -> str:
    """``job <id> <STATUS>: <Ray's reason>`` followed by the last ``lines`` lines of its log."""
    client = client or connect(address)
    info = client.get_job_info(job_id)
    tail = "\n".join(client.get_job_logs(job_id).rstrip().splitlines()[-lines:])
    return f"job {job_id} {info.status.value}: {info.message or 'no message'}\n--- last {lines} log lines ---\n{tail}"


def list_jobs(address: Optional[str], *, client=None) -> list:
    """Every job the cluster knows (``ray.job_submission.JobDetails``), oldest first."""
    jobs = (client or connect(address)).list_jobs()
    return sorted(jobs, key=lambda j: j.start_time or 0)


def stop_job(address: Optional[str], job_id: str, *, client=None) -> bool:
    """Ask the cluster to stop the job; True if it was running and is being stopped."""
    return (client or connect(address)).stop_job(job_id)


# --- `raylm submit` ---------------------------------------------------------------------------


def add_submit_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``submit`` subcommand to a ``parser.add_subparsers()`` object; returns its parser."""
    p = subparsers.add_parser(
        "submit",
        help="run a raylm command on a Ray cluster as a Ray Job (or list/stop/tail jobs)",
        description="Submit `python -m orchestration COMMAND ...` to a Ray cluster's Jobs API with this "
        "repository as the working dir, e.g. `raylm submit --address http://127.0.0.1:8265 "
        "--follow -- train --config configs/shakespeare.yaml`. Reach a remote cluster's port "
        "8265 through an SSH tunnel (`ray dashboard cluster.yaml`), never over the internet.",
    )
    p.add_argument(
        "--address", default=None, help=f"Jobs API URL (default: RAY_API_SERVER_ADDRESS, else {DEFAULT_ADDRESS})"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--follow", action="store_true", help="stream the job's logs until it ends; exit 1 unless it succeeded"
    )
    mode.add_argument("--wait", action="store_true", help="wait for the job to end; exit 1 unless it succeeded")
    mode.add_argument("--list", action="store_true", help="list the cluster's jobs and exit")
    mode.add_argument("--stop", metavar="JOB_ID", help="stop a job and exit")
    mode.add_argument("--logs", metavar="JOB_ID", help="print a job's logs (follows a running job) and exit")
    mode.add_argument("--status", metavar="JOB_ID", help="print a job's status and exit")
    p.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for the job (repeatable)"
    )
    p.add_argument(
        "--pip",
        action="store_true",
        help="install raylm's pinned dependencies (pyproject.toml) for the job; not needed on "
        "clusters set up from cluster.yaml / configs/clusters/",
    )
    p.add_argument("--working-dir", default=".", help="directory uploaded as the job's working dir (default: .)")
    p.add_argument("--job-id", default=None, help="submission id to use (default: Ray generates one)")
    p.add_argument(
        "--allow-insecure-token",
        action="store_true",
        help="send the cluster auth token even over plain http:// to a non-loopback host (refused by "
        "default: use https:// or an SSH tunnel to 127.0.0.1 instead)",
    )
    p.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND ...",
        help="the raylm command and its arguments, after '--'",
    )
    p.set_defaults(func=cmd_submit)
    return p


def cmd_submit(args: argparse.Namespace) -> int:
    """Handler for ``raylm submit``; returns the process exit code."""
    address = normalize_address(args.address)
    try:
        client = connect(address, allow_insecure_token=args.allow_insecure_token)
        if args.list:
            for job in list_jobs(address, client=client):
                print(f"{job.submission_id or job.job_id}\t{job.status.value}\t{job.entrypoint}")
            return 0
        if args.stop:
            print(f"{args.stop}: {'stopping' if stop_job(address, args.stop, client=client) else 'was not running'}")
            return 0
        if args.status:
            print(job_status(address, args.status, client=client))
            return 0
        if args.logs:
            if job_status(address, args.logs, client=client) in TERMINAL_STATUSES:
                print(job_logs(address, args.logs, client=client), end="")
            else:
                follow_logs(address, args.logs, client=client)
            return 0
        job_id = submit(
            address,
            args.command,
            env=parse_env(args.env),
            follow=args.follow,
            wait=args.wait,
            pip=pip_requirements() if args.pip else None,
            working_dir=args.working_dir,
            job_id=args.job_id,
            client=client,
        )
    except JobFailedError as err:
        print(f"raylm submit: {err}", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"raylm submit: {err}", file=sys.stderr)
        return 2
    if not (args.follow or args.wait):
        print(f"[raylm] follow it with: raylm submit --address {address} --logs {job_id}")
    return 0
