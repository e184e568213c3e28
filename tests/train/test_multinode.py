"""Multi-node behaviour on one machine: a ``ray.cluster_utils.Cluster`` of several raylets (each its
own node with its own CPUs), data and storage on a moto S3 server; an autoscaling cluster whose
worker nodes (raylets too) the autoscaler adds. Each cluster runs in a child process
(tests/train/multinode_run.py, autoscaling_run.py) with a Ray temp dir of its own, so the test
session's own Ray stays untouched; both start with the session (tests/conftest.py
``cluster_scenarios``) and run beside the other tests, whose CPUs they mostly leave idle while they
wait on Ray's failure detection, its 20-s resource re-read and the autoscaler."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def multinode(cluster_scenarios) -> dict:
    """multinode_run.py's result: the lost-node scenario, then the elastic one, on one 3-node cluster
    (one cluster start, one process), with the tiny corpus and both runs on its own S3 server."""
    result = cluster_scenarios["multinode"].result()[0]
    print("timeline (s):", result["timeline"])
    return result


@pytest.fixture(scope="module")
def autoscaling(cluster_scenarios):
    return cluster_scenarios["autoscaling"]


def test_a_lost_node_costs_no_step_beyond_the_last_checkpoint(multinode):
    """3 workers on 3 nodes (ZeRO-1); one node is removed after the step-10 checkpoint; the run fails,
    and running it again on the 2 nodes left (2 workers, same global batch: the ZeRO state reshards)
    continues from the newest complete checkpoint to the end, every step logged once."""
    result = multinode["lost_node"]
    print({k: v for k, v in result.items() if k != "records"})

    assert len(result["worker_nodes"]) == 3  # one worker per node
    assert result["first_run_error"] not in (None, "still running")  # the node loss ended the first run
    lost_at = result["checkpoint_after_loss"]
    assert 10 <= lost_at < 60
    records = result["records"]
    steps = [r["step"] for r in records]
    assert steps == list(range(5, 65, 5))  # every logged step once: up to the checkpoint, then resumed
    assert all(r["start_step"] == 0 for r in records if r["step"] <= lost_at)
    assert all(r["start_step"] == lost_at for r in records if r["step"] > lost_at)
    assert all(len(r["data_read_rows_per_rank"]) == (3 if r["step"] <= lost_at else 2) for r in records)
    assert result["summary"]["final_step"] == 60 and records[-1]["loss"] < records[0]["loss"] - 0.2


def test_an_elastic_run_continues_on_fewer_workers_and_grows_back(multinode):
    """2 workers on the 2 nodes the lost-node scenario left, train.min_workers=1: a node removed after
    the first checkpoint, the run goes on with 1 worker (same global batch, ZeRO state resharded) from
    its newest checkpoint; a node added back once that worker has checkpointed, it grows to 2 workers
    again from its newest checkpoint; no restart by hand, every step logged once. Once grown, `raylm
    stop`'s request ends it at the next log interval with a consolidated checkpoint there."""
    result = multinode["elastic"]
    records = result["records"]
    workers = [len(r["data_read_rows_per_rank"]) for r in records]
    print(result["error"], result["summary"], {k: v for k, v in result.items() if k.startswith("checkpoint")})
    print(list(zip([r["step"] for r in records], workers, [r["start_step"] for r in records])))
    final_step, every = result["summary"]["final_step"], result["log_interval"]
    assert result["error"] is None and result["stopped_on_request"] and records[-1].get("stopped_on_request")
    assert final_step == records[-1]["step"] < result["max_steps"]  # stopped on request, not at the end
    assert result["summary"]["checkpoint"].endswith(f"checkpoint_{final_step:08d}")
    assert result["checkpoint_consolidated"]  # what eval, export and serve load
    assert [r["step"] for r in records] == list(range(every, final_step + every, every))  # every logged step once
    shrunk = workers.index(1)
    grown = shrunk + workers[shrunk:].index(2)
    assert workers[0] == 2 and set(workers[shrunk:grown]) == {1} and set(workers[grown:]) == {2}  # 2, 1, 2
    # each phase started from a checkpoint no older than the newest one when its node went or came:
    # no step lost beyond the newest checkpoint
    starts = [records[0]["start_step"], records[shrunk]["start_step"], records[grown]["start_step"]]
    assert starts[0] == 0
    assert starts[1] >= result["checkpoint_at_removal"] and starts[2] >= result["checkpoint_at_node_added"]
    assert {r["start_step"] for r in records} == set(starts)  # no other restart
    assert all(r["start_step"] == starts[1] for r in records[shrunk:grown])
    assert all(r["start_step"] == starts[2] for r in records[grown:])
    # each resize converted its checkpoint once (rank 0) and every rank downloaded a share of it
    for first, workers_now in ((records[shrunk], 1), (records[grown], 2)):
        reshard = first["reshard"]
        assert sum(reshard["conversions"]) == 1 and len(reshard["downloaded_bytes"]) == workers_now, reshard
        assert all(0 < got <= 1.5 * reshard["universal_bytes"][0] / workers_now for got in reshard["downloaded_bytes"])


def test_a_cluster_with_no_worker_nodes_scales_up_for_a_run(autoscaling):
    """A head with no CPUs and an autoscaler whose worker node type starts at zero nodes (Ray's fake
    multi-node provider): `raylm train` for 2 workers x 1 CPU says it waits for the autoscaler instead
    of refusing, the autoscaler adds the 2 nodes and the run finishes."""
    result, stdout = autoscaling.result()
    print(result)
    assert result["worker_nodes_before"] == 0 and result["worker_nodes_after"] == 2
    assert "waiting up to 300 s (train.scale_up_timeout_s) for the autoscaler to add nodes" in stdout
    assert result["summary"]["final_step"] == 10
