"""`raylm submit`: Ray Jobs against a real Ray head started here, plus the pure helpers.

The head is its own cluster (`ray start --head --block`), separate from the session's `ray.init()`
instance: its own ports and temp dir, token authentication on with a token made up here, the
dashboard on 127.0.0.1 only. It is stopped by signalling the `ray start` process this fixture
started, never with `ray stop` (which kills every Ray instance of the user on the machine).
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import free_ports, tiny_corpus_manifest

from orchestration.deploy import submit as sub

ROOT = Path(__file__).parents[2]


# --- helpers, no Ray ----------------------------------------------------------------------------


def test_entrypoint_quotes_arguments_and_drops_the_separator():
    assert (
        sub.entrypoint(["--", "train", "--config", "my configs/x.yaml", "train.lr=3e-4"])
        == "python -m orchestration train --config 'my configs/x.yaml' train.lr=3e-4"
    )
    with pytest.raises(ValueError, match="no raylm command"):
        sub.entrypoint(["--"])


def test_parse_env_rejects_malformed_pairs():
    assert sub.parse_env(["A=1", "B_C=x=y", "EMPTY="]) == {"A": "1", "B_C": "x=y", "EMPTY": ""}
    for bad in ("NOEQUALS", "=v", "BAD-KEY=1"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            sub.parse_env([bad])


def test_runtime_env_uploads_the_repo_without_outputs_and_keeps_loopback_env_local():
    local = sub.runtime_env("http://127.0.0.1:8265", env={"A": "1", "PYTHONUNBUFFERED": "0"}, working_dir=str(ROOT))
    assert local["working_dir"] == str(ROOT)
    assert {"/.venv/", "/.git/", "/runs/", "/data/"} <= set(local["excludes"])
    assert "data_pipeline/" not in local["excludes"]  # anchored: only the top-level data/ is left out
    assert local["env_vars"]["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert local["env_vars"]["A"] == "1" and local["env_vars"]["PYTHONUNBUFFERED"] == "0"  # --env wins
    remote = sub.runtime_env("http://10.0.0.5:8265", pip=["numpy==2.0"])
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in remote["env_vars"]  # would break a multi-node cluster
    assert remote["pip"]["packages"] == ["numpy==2.0"]


def test_pip_requirements_pin_installed_versions_without_ray():
    from importlib.metadata import version

    reqs = sub.pip_requirements()
    assert not [r for r in reqs if r.startswith("ray")]
    assert f"torch=={version('torch').split('+')[0]}" in reqs
    assert all("==" in r for r in reqs)


def test_insecure_address_warns_with_the_tunnel_recipe():
    err = io.StringIO()
    assert sub.warn_if_insecure("http://203.0.113.7:8265", stream=err)
    assert "ray dashboard cluster.yaml" in err.getvalue() and "ssh -N -L 8265" in err.getvalue()
    assert "kubectl port-forward" in err.getvalue()
    for fine in ("http://127.0.0.1:8265", "localhost:8265", "http://[::1]:8265", "https://ray.example.com"):
        assert not sub.warn_if_insecure(fine, stream=err)


def test_token_is_never_sent_over_plain_http_to_another_host_without_consent(monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cr3t-token")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    for insecure in ("http://203.0.113.7:8265", "10.0.0.5:8265", "http://head.example.com:8265"):
        with pytest.raises(sub.InsecureTokenError, match="--allow-insecure-token") as err:
            sub.auth_headers(insecure)
        assert "s3cr3t-token" not in str(err.value) and "ssh -N -L 8265" in str(err.value)
        assert sub.auth_headers(insecure, allow_insecure_token=True) == {"Authorization": "Bearer s3cr3t-token"}
    for fine in ("http://127.0.0.1:8265", "localhost:8265", "http://[::1]:8265", "https://ray.example.com"):
        assert sub.auth_headers(fine) == {"Authorization": "Bearer s3cr3t-token"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("HOME", "/nonexistent")
    assert sub.auth_headers("http://203.0.113.7:8265") is None  # no token, nothing to leak

    # The CLI refuses before any connection (203.0.113.0/24 is unroutable: a connection would hang),
    # with exit status 2 and the way out on stderr, for job submission and every other action.
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cr3t-token")
    parser = argparse.ArgumentParser()
    sub.add_submit_parser(parser.add_subparsers(dest="cmd"))
    for action in (["--list"], ["--status", "raysubmit_1"], ["--", "train"]):
        args = parser.parse_args(["submit", "--address", "http://203.0.113.7:8265", *action])
        assert not args.allow_insecure_token
        assert sub.cmd_submit(args) == 2
        err = capsys.readouterr().err
        assert "refusing to send the cluster auth token over plain HTTP" in err and "--allow-insecure-token" in err
        assert "s3cr3t-token" not in err
    assert parser.parse_args(["submit", "--allow-insecure-token", "--list"]).allow_insecure_token


def test_auth_token_is_read_in_rays_order(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert sub.auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert sub.auth_token() == "from-home"
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert sub.auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert sub.auth_token() == "from-env"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="RAY_AUTH_TOKEN_PATH"):
        sub.auth_token()


def test_submit_waits_for_a_job_agent_and_raises_other_errors_at_once():
    """A head that has just started answers 500 "No available agent" until its job agent registers."""

    class Head:
        def __init__(self, error: str, failures: int):
            self.error, self.failures, self.calls = error, failures, 0

        def submit_job(self, **kwargs) -> str:
            self.calls += 1
            if self.calls <= self.failures:
                raise RuntimeError(f"Request failed with status code 500: {self.error}")
            return "raysubmit_1"

    out = io.StringIO()
    starting = Head("No available agent to submit job, please try again later..", failures=2)
    job_id = sub.submit("http://127.0.0.1:8265", ["train"], working_dir=str(ROOT), client=starting, out=out)
    assert job_id == "raysubmit_1"
    assert starting.calls == 3 and out.getvalue().count("no job agent yet") == 2
    broken = Head("Internal Server Error", failures=1)
    with pytest.raises(RuntimeError, match="Internal Server Error"):
        sub.submit("http://127.0.0.1:8265", ["train"], working_dir=str(ROOT), client=broken, out=io.StringIO())
    assert broken.calls == 1


def test_submit_parser_takes_the_command_after_the_separator():
    parser = argparse.ArgumentParser()
    sub.add_submit_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(
        [
            "submit",
            "--address",
            "http://127.0.0.1:8265",
            "--follow",
            "--env",
            "K=V",
            "--",
            "train",
            "--config",
            "configs/x.yaml",
            "train.max_steps=5",
        ]
    )
    assert args.func is sub.cmd_submit and args.follow and args.env == ["K=V"]
    assert sub.entrypoint(args.command) == "python -m orchestration train --config configs/x.yaml train.max_steps=5"
    assert parser.parse_args(["submit", "--stop", "raysubmit_1"]).stop == "raysubmit_1"
    with pytest.raises(SystemExit):
        parser.parse_args(["submit", "--list", "--stop", "x"])  # one action at a time


# --- a real Ray head ----------------------------------------------------------------------------


def _our_leftovers(temp_dir: str, gcs_address: str) -> list[int]:
    """PIDs of processes of the cluster this fixture started: Ray's own name the temp dir on their
    command line, the job drivers carry its GCS address in their environment."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if temp_dir.encode() in cmdline or f"RAY_ADDRESS={gcs_address}\0".encode() in environ:
            pids.append(int(proc.name))
    return pids


@pytest.fixture(scope="module")
def ray_head():
    """A token-authenticated Ray head on 127.0.0.1; yields (jobs API URL, auth token)."""
    temp_dir = tempfile.mkdtemp(prefix="rlsub_", dir="/tmp")  # short: Ray's socket paths are length-limited
    (gcs, dash, client, agent_http, agent_grpc, metrics, renv, node_mgr, obj_mgr) = free_ports(9)
    token = secrets.token_hex(16)
    # The job finds its own TORCH_EXTENSIONS_DIR: its PATH (below) may hold another ninja than ours.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "TORCH_EXTENSIONS"))}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    ray_bin = str(Path(sys.executable).parent / "ray")
    log = open(Path(temp_dir) / "ray_start.log", "wb")
    proc = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            "--num-cpus=2",
            "--num-gpus=0",
            f"--temp-dir={temp_dir}",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={renv}",
            f"--node-manager-port={node_mgr}",
            f"--object-manager-port={obj_mgr}",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RAY_AUTH_TOKEN", token)
            while True:  # up once the Jobs API answers an authenticated list
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"ray start exited {proc.returncode}: {(Path(temp_dir) / 'ray_start.log').read_text()}"
                    )
                try:
                    sub.list_jobs(url)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)
        yield url, token
    finally:
        # `ray start --block` shuts its own processes down on SIGTERM (no drain wait: see env above)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        time.sleep(1)
        for pid in _our_leftovers(temp_dir, f"127.0.0.1:{gcs}"):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


FAKE_AWS_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIARAYLMTESTFAKE0001",
    "AWS_SECRET_ACCESS_KEY": "raylm/test+fake/secret/never/written/0001",
}


@pytest.fixture
def head(ray_head, monkeypatch):
    """The head's URL, with this process holding its token the way a user would (RAY_AUTH_TOKEN)."""
    url, token = ray_head
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    return url, token


@pytest.mark.slow
def test_requests_without_the_token_are_refused(head):
    url, _ = head
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{url}/api/jobs/", timeout=10)
    assert err.value.code == 401


@pytest.mark.slow
def test_train_job_succeeds_and_streams_its_logs(head, tmp_path, capsys):
    url, token = head
    manifest = tiny_corpus_manifest(tmp_path)
    out = io.StringIO()
    job_id = sub.submit(
        url,
        [
            "--",
            "train",
            f"train.data={manifest}",
            f"train.storage_path={tmp_path / 'runs'}",
            "train.run_name=submitted",
            "train.num_workers=1",
            "train.cpus_per_worker=1",
            "train.micro_batch_size=4",
            "train.grad_accum_steps=1",
            "train.max_steps=4",
            "train.warmup_steps=1",
            "train.log_interval=2",
            "train.eval_interval=4",
            "train.val_sequences=4",
            "train.checkpoint_interval=4",
            "model.block_size=32",
            "model.n_layer=1",
            "model.n_head=2",
            "model.n_embd=32",
        ],
        env=FAKE_AWS_CREDENTIALS,
        follow=True,
        working_dir=str(ROOT),
        out=out,
    )
    logs = out.getvalue()
    assert sub.job_status(url, job_id) == "SUCCEEDED"
    assert "[raylm] done" in logs and f"{job_id} SUCCEEDED" in logs  # streamed, then the verdict
    assert (tmp_path / "runs" / "submitted" / "metrics.jsonl").is_file()
    assert "[raylm] done" in sub.job_logs(url, job_id)
    captured = capsys.readouterr()
    assert token not in logs + captured.out + captured.err  # the token is sent, never printed
    assert job_id in [j.submission_id for j in sub.list_jobs(url)]
    assert sub.stop_job(url, job_id) is False  # already finished
    # Credentials in the job's environment never reach the run directory (config, metrics, checkpoints).
    written = [f for f in (tmp_path / "runs" / "submitted").rglob("*") if f.is_file()]
    assert any(f.name == "model.safetensors" for f in written)
    for secret in FAKE_AWS_CREDENTIALS.values():
        assert not [f for f in written if secret.encode() in f.read_bytes()], f"{secret} written under the run dir"


@pytest.mark.slow
def test_failing_job_reports_failed_with_its_log_tail(head, capsys):
    url, _ = head
    with pytest.raises(sub.JobFailedError) as err:
        sub.submit(url, ["train", "train.no_such_key=1"], wait=True, working_dir=str(ROOT))
    assert err.value.status == "FAILED"
    assert "no_such_key" in str(err.value)  # the config error from the job's own log
    # The CLI handler turns the same failure into exit code 1 with the report on stderr.
    parser = argparse.ArgumentParser()
    sub.add_submit_parser(parser.add_subparsers(dest="cmd"))
    code = sub.cmd_submit(
        parser.parse_args(
            ["submit", "--address", url, "--working-dir", str(ROOT), "--wait", "--", "train", "train.no_such_key=1"]
        )
    )
    assert code == 1 and "FAILED" in capsys.readouterr().err
    assert sub.cmd_submit(parser.parse_args(["submit", "--address", url, "--list"])) == 0
    assert err.value.job_id in capsys.readouterr().out
