"""Shared fixtures: one local Ray instance per session and a real S3-compatible server on 127.0.0.1.

Environment set here, before anything imports ray: Ray sockets stay on loopback, Ray Train's
controller polls fast (report latency), DeepSpeed's CPU op builds are cached across runs, and
credential lookup never probes the network.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestration.runtime import extensions_dir

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# Test credentials for the moto S3 server, in the environment before Ray starts so every Ray worker
# finds them through the default chain, as an instance role's are found on a cluster node.
TEST_ACCESS_KEY, TEST_SECRET_KEY = "raylm-test-access-key", "raylm-test-secret-key"
os.environ.update(AWS_ACCESS_KEY_ID=TEST_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=TEST_SECRET_KEY)
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ["TORCH_EXTENSIONS_DIR"] = extensions_dir()  # one per ninja version: see there
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for the whole test session (starting Ray costs seconds)."""
    import shutil
    import tempfile

    import ray

    temp_dir = None
    if not ray.is_initialized():
        from helpers import free_ports

        # Ray Train's placement-group cleaner (an actor) finds its cluster through the state API's address
        # lookup, which refuses to choose among several local Rays (a pytest-xdist worker's, the cluster
        # scenarios') unless the temp dir's ray/ray_current_cluster names one: the session's Ray gets a temp
        # dir of its own naming it (short: Ray's socket paths are length-limited). Its processes inherit
        # RAY_TMPDIR from ray.init; the commands tests start do not (a `ray stop` there would remove the file).
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        temp_dir = tempfile.mkdtemp(prefix=f"rl{worker}_", dir="/tmp")
        previous = os.environ.get("RAY_TMPDIR")
        os.environ["RAY_TMPDIR"] = temp_dir
        # The dashboard hosts the state API that Ray Train's placement-group cleaner polls; without it, a
        # finished (or ASHA-stopped) trial's worker reservations linger and starve later trainers. A free
        # port, not 8265: each pytest-xdist worker starts a Ray of its own, and a second dashboard on a
        # taken port fails.
        ray.init(
            num_cpus=2,
            dashboard_port=free_ports(1)[0],
            log_to_driver=True,
            runtime_env={
                "env_vars": {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]}
            },
        )
        Path(temp_dir, "ray", "ray_current_cluster").write_text(ray.get_runtime_context().gcs_address)
        if previous is None:
            del os.environ["RAY_TMPDIR"]
        else:
            os.environ["RAY_TMPDIR"] = previous
    yield ray
    ray.shutdown()
    if temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server (moto) on 127.0.0.1; the test credentials are in the env.

    Yields a dict: endpoint_url, access_key, secret_key, region, and ``server`` (helpers.RestartableS3,
    whose ``outage(seconds)`` takes it away and brings it back with its objects). Code under test
    reaches it through the same boto3 / pyarrow S3 code paths it uses against AWS, configured by
    endpoint_url.
    """
    from helpers import RestartableS3

    server = RestartableS3()
    yield {
        "endpoint_url": server.endpoint_url,
        "access_key": TEST_ACCESS_KEY,
        "secret_key": TEST_SECRET_KEY,
        "region": "us-east-1",
        "server": server,
    }
    server.stop()


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> str:
    """The manifest of the tiny corpus (tests/helpers.py ``tiny_corpus_manifest``) every training test
    shares; read-only: a test that damages or moves data takes its own copy with ``tiny_corpus_manifest``."""
    from helpers import tiny_corpus_manifest

    return tiny_corpus_manifest(tmp_path_factory.mktemp("tiny_corpus"))


@pytest.fixture(scope="session")
def reference_runs(ray_session, tiny_corpus, tmp_path_factory):
    """helpers.ReferenceRuns: one uninterrupted tiny run per ZeRO stage, trained on first use, shared by
    every test that compares against a reference or starts from a pretrained checkpoint."""
    from helpers import ReferenceRuns

    return ReferenceRuns(tmp_path_factory.mktemp("reference_runs"), tiny_corpus)


@pytest.fixture(scope="session")
def demo_runs(ray_session, tmp_path_factory) -> dict:
    """helpers.run_demo_and_finetunes: `raylm demo` on a few kB of the plays, then every
    configs/finetune_*.yaml from its checkpoint, in a directory of their own; the demo test checks the
    README path and the fine-tuning tests check each task on the same runs."""
    from helpers import run_demo_and_finetunes

    return run_demo_and_finetunes(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def sort_based_shuffle(ray_session):
    """A module's prepares and dedups on Ray Data's sort-based shuffle: the same group-bys, ~1-2 s each
    instead of 15-20 s on SHUFFLE_V2 (Ray 2.60's default, which starts new worker processes for every
    group-by); test_data_prepare.py's ``prepared`` re-runs one prepare on SHUFFLE_V2 for identical bytes."""
    from ray.data.context import ShuffleStrategy

    from data_pipeline.prepare import ray_data_shuffle

    with ray_data_shuffle(ShuffleStrategy.SORT_SHUFFLE_PULL_BASED):
        yield


CLUSTER_SCENARIOS = "test_multinode.py"  # the tests that read cluster_scenarios
# The modules that use a session fixture that trains runs: pytest-xdist runs them all on one worker, which
# builds each run once (SharedRunScheduling), and they go first, being the longest.
SHARED_RUN_MODULES = ("tests/finetune/test_finetune.py", "tests/test_demo.py", "tests/train/test_train_ray.py")
SHARED_RUNS = ("demo_runs", "reference_runs")
# Modules that start a Ray head of their own: last, when the cluster scenarios and the shared runs are done
# (a head started beside them on 2 busy cores lost its job agent and its dashboard)
OWN_HEAD_MODULES = ("tests/deploy/test_submit.py",)


def pytest_collection_modifyitems(config, items):
    """A module that uses a shared run must be in SHARED_RUN_MODULES (else a worker builds the run again);
    those modules go first, OWN_HEAD_MODULES last."""
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        used = [name for name in SHARED_RUNS if name in item.fixturenames]
        if used and module not in SHARED_RUN_MODULES:
            raise pytest.UsageError(
                f"{module} uses {used[0]}: add it to SHARED_RUN_MODULES in tests/conftest.py, so pytest-xdist "
                "runs it on the worker that holds that run"
            )

    def rank(item) -> int:
        module = item.nodeid.split("::", 1)[0]
        return 0 if module in SHARED_RUN_MODULES else 2 if module in OWN_HEAD_MODULES else 1

    items.sort(key=rank)  # stable: the order within each rank is kept


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scheduling by module (``--dist loadfile``), with SHARED_RUN_MODULES one unit of work.

    Not ``--dist loadgroup`` with ``xdist_group`` marks: on pytest 9.2 it no longer groups at all
    (pytest-dev/pytest-xdist#1386)."""
    from xdist.scheduler import LoadFileScheduling

    class SharedRunScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = super()._split_scope(nodeid)
            return "shared runs" if module in SHARED_RUN_MODULES else module

    return SharedRunScheduling(config, log)


@pytest.fixture(scope="session")
def cluster_scenarios(tmp_path_factory) -> dict:
    """The simulated-cluster scenarios (tests/train/multinode_run.py, autoscaling_run.py), each a
    helpers.Child process with a Ray temp dir and an S3 server of its own. ``start_cluster_scenarios``
    starts them with the session when their tests are selected: they mostly wait on Ray (failure
    detection, the 20-s resource re-read, the autoscaler), so they run beside the other tests.

    Under pytest-xdist the first worker (gw0) starts them in a directory all workers share, and the
    worker that runs their tests reads their results there."""
    import shutil
    import tempfile
    from pathlib import Path

    from helpers import Child, tiny_corpus_manifest

    scripts = Path(__file__).parent / "train"
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    shared = tmp_path_factory.getbasetemp().parent if worker else tmp_path_factory.getbasetemp()
    multinode_root, autoscaling_root = shared / "multinode", shared / "autoscaling"
    if worker not in (None, "gw0"):
        yield {
            "multinode": Child.attach(scripts / "multinode_run.py", multinode_root),
            "autoscaling": Child.attach(scripts / "autoscaling_run.py", autoscaling_root),
        }
        return
    multinode_root.mkdir()
    autoscaling_root.mkdir()
    ray_tmpdir = tempfile.mkdtemp(prefix="rlmn_", dir="/tmp")  # short: Ray's socket paths are length-limited
    children = {
        "multinode": Child.start(
            scripts / "multinode_run.py", multinode_root, "--root", str(multinode_root), "--ray-tmpdir", ray_tmpdir
        ),
        "autoscaling": Child.start(
            scripts / "autoscaling_run.py",
            autoscaling_root,
            "--manifest",
            tiny_corpus_manifest(autoscaling_root),
            "--storage",
            str(autoscaling_root / "runs"),
        ),
    }
    yield children
    for child in children.values():  # a deselected test's child still stops its own cluster: wait for it
        child.wait(timeout_s=600)
    shutil.rmtree(ray_tmpdir, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def start_cluster_scenarios(request):
    """``cluster_scenarios`` from the session's start, when any of their tests is selected (under
    pytest-xdist, on gw0, which starts them; the others attach when they run one of those tests)."""
    selected = any(item.path.name == CLUSTER_SCENARIOS for item in request.session.items)
    if selected and os.environ.get("PYTEST_XDIST_WORKER") in (None, "gw0"):
        request.getfixturevalue("cluster_scenarios")
