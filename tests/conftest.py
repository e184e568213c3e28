"""Shared fixtures: one local Ray instance per session and a real S3-compatible server on 127.0.0.1.

Environment set here, before anything imports ray: Ray sockets stay on loopback, Ray Train's
controller polls fast (report latency), DeepSpeed's CPU op builds are cached across runs, and
credential lookup never probes the network.
"""

from __future__ import annotations

import os

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
    import ray

    if not ray.is_initialized():
        # The dashboard hosts the state API that Ray Train's placement-group cleaner polls; without it, a
        # finished (or ASHA-stopped) trial's worker reservations linger and starve later trainers.
        ray.init(
            num_cpus=2,
            log_to_driver=True,
            runtime_env={
                "env_vars": {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]}
            },
        )
    yield ray
    ray.shutdown()


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


@pytest.fixture(scope="session")
def cluster_scenarios(tmp_path_factory) -> dict:
    """The simulated-cluster scenarios (tests/train/multinode_run.py, autoscaling_run.py), each a
    helpers.Child process with a Ray temp dir and an S3 server of its own. ``start_cluster_scenarios``
    starts them with the session when their tests are selected: they mostly wait on Ray (failure
    detection, the 20-s resource re-read, the autoscaler), so they run beside the other tests."""
    import shutil
    import tempfile
    from pathlib import Path

    from helpers import Child, tiny_corpus_manifest

    scripts = Path(__file__).parent / "train"
    multinode_root = tmp_path_factory.mktemp("multinode")
    ray_tmpdir = tempfile.mkdtemp(prefix="rlmn_", dir="/tmp")  # short: Ray's socket paths are length-limited
    autoscaling_root = tmp_path_factory.mktemp("autoscaling")
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
        child.proc.wait(timeout=600)
    shutil.rmtree(ray_tmpdir, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def start_cluster_scenarios(request):
    """``cluster_scenarios`` from the session's start, when any of their tests is selected."""
    if any(item.path.name == CLUSTER_SCENARIOS for item in request.session.items):
        request.getfixturevalue("cluster_scenarios")
