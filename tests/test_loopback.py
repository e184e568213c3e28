"""A Ray that a local `raylm` command starts listens on loopback only (issue 30).

The slow tests run one real command each in a subprocess with the environment of a user's shell (no
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, no RAY_ADDRESS) and a RAY_TMPDIR of their own, sample with psutil
the listening TCP sockets of every process of the Ray that command started, and fail on any address
outside 127.0.0.0/8 and ::1. The command's processes are its descendants plus every process that
inherited its RAY_TMPDIR (Ray's daemons, wherever they were reparented) and their descendants.

Why they cannot reuse the session's Ray or the shared runs: what is tested is how a fresh command
starts Ray from a plain shell, and the session's Ray is started by conftest with the variable already
set, which hides the bug. So the module starts two Rays of its own: one tiny `raylm train` (4 steps,
2 workers) and one `raylm serve` of the checkpoint that run saved.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest

from tests.helpers import free_ports, tiny_corpus_manifest

TRAIN_OVERRIDES = [
    "train.num_workers=2",
    "train.cpus_per_worker=0.5",
    "train.micro_batch_size=4",
    "train.grad_accum_steps=1",
    "train.max_steps=4",
    "train.warmup_steps=1",
    "train.log_interval=2",
    "train.eval_interval=4",
    "train.val_sequences=8",
    "train.checkpoint_interval=4",
    "model.block_size=32",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
]
SAMPLE_INTERVAL_S = 0.3
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class Listener(NamedTuple):
    pid: int
    ip: str
    port: int
    title: str  # the process's command line (a Ray worker's names its actor)

    def __str__(self) -> str:
        return f"{self.ip}:{self.port} in pid {self.pid} ({self.title.strip()})"


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def command_env(ray_tmpdir: str) -> dict:
    """The environment a user's shell gives the command, plus a RAY_TMPDIR that marks its Ray's processes."""
    env = {k: v for k, v in os.environ.items() if k not in (LOOPBACK_ENV, "RAY_ADDRESS", "GLOO_SOCKET_IFNAME")}
    return {**env, "RAY_TMPDIR": ray_tmpdir, "PYTHONUNBUFFERED": "1"}


def command_processes(command: psutil.Process, ray_tmpdir: str) -> list[psutil.Process]:
    """The command and every process that inherited its RAY_TMPDIR (Ray's daemons, wherever they were
    reparented), with all their descendants (workers and agents: their retitling hides their environment)."""
    roots = [command]
    for proc in psutil.process_iter():
        try:
            if proc.pid != command.pid and proc.environ().get("RAY_TMPDIR") == ray_tmpdir:
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    found = {}
    for root in roots:
        try:
            found.update({p.pid: p for p in [root, *root.children(recursive=True)]})
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def listening_sockets(procs: list[psutil.Process]) -> set[Listener]:
    """The TCP sockets these processes listen on."""
    found = set()
    for proc in procs:
        try:
            title = " ".join(proc.cmdline())[:100]
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add(Listener(proc.pid, conn.laddr.ip, conn.laddr.port, title))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


class Command:
    """A `raylm` command run in the background whose Ray's listening sockets are sampled."""

    def __init__(self, args: list[str], ray_tmpdir: str, log: Path):
        self.ray_tmpdir, self.log = ray_tmpdir, log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestration", *args],
            env=command_env(ray_tmpdir),
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).parents[1],
        )
        self.process = psutil.Process(self.proc.pid)
        self.sockets: dict[tuple[int, str, int], Listener] = {}  # a worker's title changes with its task
        self.seen_titles: set[str] = set()

    def sample(self) -> None:
        for listener in listening_sockets(command_processes(self.process, self.ray_tmpdir)):
            self.sockets[listener.pid, listener.ip, listener.port] = listener
            self.seen_titles.add(listener.title.strip())

    def sample_until_exit(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.sample()
            time.sleep(SAMPLE_INTERVAL_S)
        return self.proc.poll()

    def stop(self) -> None:
        """Ctrl-C (the command shuts its Ray down), then kill whatever of its Ray is left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for proc in command_processes(self.process, self.ray_tmpdir):
            try:
                if proc.pid != self.proc.pid:
                    proc.kill()
            except psutil.NoSuchProcess:
                continue

    def outside_loopback(self) -> list[Listener]:
        return sorted(s for s in self.sockets.values() if not is_loopback(s.ip))

    def titles(self) -> str:
        return " | ".join(sorted(self.seen_titles))


def is_torch_store(listener: Listener) -> bool:
    """torch.distributed's TCPStore: the process group's rendezvous, which the rank-0 training worker
    hosts. torch binds it to every interface ([::]) whatever MASTER_ADDR is unless it is handed a bound
    socket (orchestration.train.rendezvous does so on a loopback node)."""
    return "RayTrainWorker" in listener.title and listener.ip in ("::", "0.0.0.0")


def report(listeners: list[Listener]) -> str:
    return "listening outside loopback:\n" + "\n".join(map(str, listeners))


@pytest.fixture(scope="module")
def ray_tmpdir():
    # Short: Ray's unix sockets live under it (108-byte path limit)
    with tempfile.TemporaryDirectory(prefix="rl30-", dir="/tmp") as path:
        yield path


@pytest.fixture(scope="module")
def train_command(tmp_path_factory, ray_tmpdir):
    """One tiny `raylm train` run from a plain shell, its sockets sampled until it exits."""
    root = tmp_path_factory.mktemp("loopback")
    manifest = tiny_corpus_manifest(root)
    args = ["train", f"train.data={manifest}", f"train.storage_path={root / 'runs'}", "train.run_name=loopback"]
    command = Command([*args, *TRAIN_OVERRIDES], ray_tmpdir, root / "train.log")
    try:
        rc = command.sample_until_exit(timeout_s=300)  # 178 s seen at load 35-58 on 2 cores
    finally:
        command.stop()
    assert rc == 0, f"raylm train exited {rc}:\n{command.log.read_text()[-3000:]}"
    return command, root / "runs" / "loopback"


@pytest.mark.slow
def test_a_training_runs_ray_listens_on_loopback_only(train_command):
    command, _ = train_command
    # The sample saw the whole Ray, not just the driver: GCS, raylet and a training worker listened
    for name in ("gcs_server", "raylet", "RayTrainWorker"):
        assert name in command.titles(), f"no listening socket of {name} seen; saw: {command.titles()}"
    outside = command.outside_loopback()
    store = [s for s in outside if is_torch_store(s)][:1]  # one rank 0: tested apart, below
    assert [s for s in outside if s not in store] == [], report(outside)


@pytest.mark.slow
def test_a_training_runs_rendezvous_store_listens_on_loopback_only(train_command):
    """Failed (strict xfail) while Ray Train's own setup created the store through env://: rank 0's
    RayTrainWorker listened on [::]."""
    command, _ = train_command
    assert [s for s in command.outside_loopback() if is_torch_store(s)] == []


@pytest.mark.slow
def test_serves_ray_listens_on_loopback_only(train_command, ray_tmpdir, tmp_path):
    _, run_dir = train_command
    (port,) = free_ports(1)
    args = ["serve", "--checkpoint", str(run_dir), "--port", str(port)]
    command = Command(args, ray_tmpdir, tmp_path / "serve.log")
    try:
        deadline = time.monotonic() + 120
        while not _healthy(port):
            assert command.proc.poll() is None, f"raylm serve exited:\n{command.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"raylm serve not healthy in 120 s:\n{command.log.read_text()[-3000:]}"
            command.sample()
            time.sleep(SAMPLE_INTERVAL_S)
        for _ in range(3):  # the replica and proxy are up now: every server they start is listening
            command.sample()
            time.sleep(SAMPLE_INTERVAL_S)
    finally:
        command.stop()
    for name in ("gcs_server", "raylet", "ServeReplica", "ProxyActor"):
        assert name in command.titles(), f"no listening socket of {name} seen; saw: {command.titles()}"
    assert ("127.0.0.1", port) in {(ip, p) for _, ip, p in command.sockets}  # the HTTP endpoint
    assert command.outside_loopback() == [], report(command.outside_loopback())


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter with a user's shell environment plus ``env``; a Ray it started by
    mistake would find no other instance to join (a RAY_TMPDIR of its own)."""
    with tempfile.TemporaryDirectory(prefix="rl30-", dir="/tmp") as ray_tmpdir:
        return subprocess.run(
            [sys.executable, "-c", code],
            env={**command_env(ray_tmpdir), **env},
            capture_output=True,
            text=True,
            cwd=Path(__file__).parents[1],
            timeout=120,
        )


PROBE = (
    "import os\n"
    "from orchestration.runtime import keep_local_ray_on_loopback\n"
    "keep_local_ray_on_loopback()\n"
    "from ray._private import ray_constants\n"
    f"print(os.environ.get('{LOOPBACK_ENV}'), os.environ.get('GLOO_SOCKET_IFNAME'), ray_constants.ENABLE_RAY_CLUSTER)\n"
)


def test_a_local_ray_takes_the_loopback_address_and_a_joined_cluster_keeps_its_own():
    assert run_python(PROBE).stdout.split() == ["0", "lo", "False"]  # Ray's node address: 127.0.0.1
    # Joining a cluster: Ray's default (the node's routable address), nothing set
    assert run_python(PROBE, RAY_ADDRESS="10.0.0.5:6379").stdout.split() == ["None", "None", "True"]


def test_a_ray_imported_too_early_is_refused_before_it_starts():
    result = run_python("import ray\nfrom orchestration.runtime import init_ray\ninit_ray()\n")
    assert result.returncode != 0
    assert f"ray was imported before {LOOPBACK_ENV}=0 was set" in result.stderr
    assert "Started a local Ray instance" not in result.stderr + result.stdout
