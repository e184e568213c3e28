"""Every shipped Ray cluster-launcher file passes Ray's own validation, scales to 128 GPUs and keeps the cluster closed.

Checked per file: Ray's schema (and, for AWS, Ray's own EFA network-interface bootstrap step); a CPU head plus
GPU worker types that start at zero and reach 16 nodes / 128 GPUs; spot and on-demand twins of each GPU type,
told apart by a node label and a `spot` resource, with Ray's autoscaler choosing between them as the header says;
EFA + cluster placement groups on p5/p4d, gVNIC + compact placement on GCP, InfiniBand SKUs on Azure; one
cluster-only network rule set; no credentials; the dashboard on 127.0.0.1; token auth; nodes installed from the
pinned lock, which matches pyproject.toml.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).parents[2]
CLUSTER_FILES = [ROOT / "cluster.yaml", *sorted((ROOT / "configs" / "clusters").glob("*.yaml"))]
LOCK = ROOT / "configs" / "clusters" / "requirements-lock.txt"
# Accelerator families by provider: each file offers every one of them.
GPU_TYPES = {"aws": ["p5.", "p4d.", "g5."], "gcp": ["a3-", "a2-"], "azure": ["ND96isr_H100_v5", "ND96asr_v4"]}
# The multi-node families: each needs an on-demand and a spot type, each reaching 16 nodes of 8 GPUs.
BIG_GPU_TYPES = {"aws": ["p5.", "p4d."], "gcp": ["a3-", "a2-"], "azure": ["ND96isr_H100_v5", "ND96asr_v4"]}
TARGET_GPUS = 128
EFA_INTERFACES = {"p5.48xlarge": 32, "p4d.24xlarge": 4}
MARKET_LABEL = "ray.io/market-type"
SECRET_PATTERNS = [
    r"aws_access_key_id",
    r"aws_secret_access_key",
    r"AKIA[0-9A-Z]{16}",
    r"client_secret",
    r"private_key_id",
    r"-----BEGIN",
    r"AccountKey=",
    r"sig=",
    r"password\s*:",
    r"token\s*:\s*(?![~/])\S{8,}",
]


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _instance_type(node_type: dict) -> str:
    nc = node_type["node_config"]
    return nc.get("InstanceType") or nc.get("machineType") or nc.get("azure_arm_parameters", {}).get("vmSize", "")


def _workers(config: dict) -> dict:
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def _big_gpu_types(config: dict) -> dict[str, dict]:
    families = BIG_GPU_TYPES[config["provider"]["type"]]
    return {n: t for n, t in _workers(config).items() if any(f in _instance_type(t) for f in families)}


def _is_spot(config: dict, node_type: dict) -> bool:
    """Whether the cloud is asked for a spot VM, read from the provider's own field."""
    nc = node_type["node_config"]
    provider = config["provider"]["type"]
    if provider == "aws":
        return nc.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    if provider == "gcp":
        return nc.get("scheduling", {}).get("provisioningModel") == "SPOT"
    return nc["azure_arm_parameters"].get("priority") == "Spot"


def _on_demand_twin(config: dict, node_type: dict) -> dict:
    """The node config with its spot settings removed: what the on-demand type of the same hardware has."""
    nc = copy.deepcopy(node_type["node_config"])
    provider = config["provider"]["type"]
    if provider == "aws":
        nc.pop("InstanceMarketOptions", None)
    elif provider == "gcp":
        nc["scheduling"] = {"onHostMaintenance": "TERMINATE"}
    else:
        for key in ("priority", "evictionPolicy", "billingProfile"):
            nc["azure_arm_parameters"].pop(key, None)
    return nc


def _start_commands(config: dict) -> str:
    return " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])


def _lock_pins() -> dict[str, Requirement]:
    lines = [ln.strip() for ln in LOCK.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    pins = [Requirement(ln) for ln in lines]
    return {canonicalize_name(r.name): r for r in pins}


def test_all_three_clouds_are_shipped_and_cluster_yaml_is_the_aws_one():
    assert {p.stem for p in CLUSTER_FILES[1:]} == {"aws", "gcp", "azure"}
    assert (ROOT / "cluster.yaml").read_text() == (ROOT / "configs" / "clusters" / "aws.yaml").read_text()


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=[p.name for p in CLUSTER_FILES])
def test_cluster_file_is_valid(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_load(path))
    validate_config(config)  # raises on a schema violation
    assert config["head_node_type"] in config["available_node_types"]
    assert config["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=[p.name for p in CLUSTER_FILES])
def test_head_is_cpu_and_gpu_workers_autoscale_from_zero(path):
    config = _load(path)
    head = config["available_node_types"][config["head_node_type"]]
    assert not any(tag in _instance_type(head) for tag in GPU_TYPES[config["provider"]["type"]])
    assert head["resources"].get("CPU") == 0  # no tasks on the head
    for family in GPU_TYPES[config["provider"]["type"]]:
        matching = [t for t in _workers(config).values() if family in _instance_type(t)]
        assert matching, f"{path.name}: no worker type on {family}"
        assert all(t["min_workers"] == 0 and t["max_workers"] > 0 for t in matching)  # scale from zero


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=[p.name for p in CLUSTER_FILES])
def test_limits_reach_16_gpu_nodes_and_128_gpus(path):
    config = _load(path)
    big = _big_gpu_types(config)
    assert len(big) == 2 * len(BIG_GPU_TYPES[config["provider"]["type"]])  # on-demand + spot per family
    for name, t in big.items():
        assert t["resources"]["GPU"] == 8, name  # stated, so the limit below is checkable from the file
        assert t["max_workers"] * t["resources"]["GPU"] >= TARGET_GPUS, name
    cpu_workers = max(t["max_workers"] for t in _workers(config).values() if not t["resources"].get("GPU"))
    # The cluster-wide cap leaves room for 16 GPU nodes next to the full CPU pool.
    assert config["max_workers"] >= TARGET_GPUS // 8 + cpu_workers


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=[p.name for p in CLUSTER_FILES])
def test_every_big_gpu_type_has_a_spot_twin_marked_by_label_and_resource(path):
    config = _load(path)
    big = _big_gpu_types(config)
    spot = {n: t for n, t in big.items() if _is_spot(config, t)}
    on_demand = {n: t for n, t in big.items() if not _is_spot(config, t)}
    assert len(spot) == len(on_demand) > 0
    for t in spot.values():
        assert t["labels"] == {MARKET_LABEL: "spot"} and t["resources"]["spot"] == 1
    for t in on_demand.values():
        assert t["labels"] == {MARKET_LABEL: "on-demand"} and "spot" not in t["resources"]
    # Each spot type is its on-demand sibling plus the spot settings: same machine, disks, network, placement.
    twins = {json.dumps(_on_demand_twin(config, t), sort_keys=True) for t in spot.values()}
    assert twins == {json.dumps(t["node_config"], sort_keys=True) for t in on_demand.values()}


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=[p.name for p in CLUSTER_FILES])
def test_ray_autoscaler_picks_on_demand_unless_asked_for_spot(path):
    """What the header promises, decided by Ray's own (v1) autoscaler scheduling function on this file."""
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

    config = _load(path)
    types = config["available_node_types"]
    scorer = partial(_default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary({}))

    def launch(bundle: dict, count: int) -> dict:
        nodes, _ = get_nodes_for(types, {}, config["head_node_type"], config["max_workers"], [bundle] * count, scorer)
        return dict(nodes)

    h100 = {n: t for n, t in _big_gpu_types(config).items() if "accelerator_type:H100" in t["resources"]}
    (h100_spot,) = [n for n, t in h100.items() if "spot" in t["resources"]]
    (h100_on_demand,) = [n for n, t in h100.items() if "spot" not in t["resources"]]
    worker = {"CPU": 1, "GPU": 1, "accelerator_type:H100": 0.001}  # what ScalingConfig(accelerator_type=) asks
    assert launch(worker, TARGET_GPUS) == {h100_on_demand: 16}
    assert launch({**worker, "spot": 0.01}, TARGET_GPUS) == {h100_spot: 16}
    plain = launch({"CPU": 1, "GPU": 1}, 16)
    assert plain and not any(types[n]["resources"].get("spot") for n in plain)


def test_the_spot_label_reaches_the_ray_node():
    """The autoscaler hands a node type's labels to `ray start` in RAY_OVERRIDE_LABELS; Ray 2.60 takes the
    reserved ray.io/market-type key from there (a real raylet in a subprocess, apart from any session Ray)."""
    labels = _load(ROOT / "cluster.yaml")["available_node_types"]["gpu_h100_spot"]["labels"]
    script = (
        "import json, os, sys\n"
        "from ray._private import ray_constants\n"
        "os.environ[ray_constants.LABELS_ENVIRONMENT_VARIABLE] = sys.argv[1]\n"
        "import ray\n"
        "from ray.cluster_utils import Cluster\n"
        "cluster = Cluster(initialize_head=True, head_node_args={'num_cpus': 0})\n"
        "ray.init(address=cluster.address)\n"
        "print(json.dumps(ray.nodes()[0]['Labels']))\n"
        "ray.shutdown()\n"
        "cluster.shutdown()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(labels)], capture_output=True, text=True, timeout=300, check=True
    )
    node_labels = json.loads(out.stdout.strip().splitlines()[-1])
    assert node_labels[MARKET_LABEL] == "spot"


def test_aws_p5_and_p4d_use_efa_in_a_cluster_placement_group():
    from ray.autoscaler._private.aws.config import _configure_from_network_interfaces

    config = _load(ROOT / "configs" / "clusters" / "aws.yaml")
    efa_types = {n: t for n, t in _workers(config).items() if _instance_type(t) in EFA_INTERFACES}
    assert len(efa_types) == 4  # p5 and p4d, each on demand and spot
    for name, t in efa_types.items():
        nc = t["node_config"]
        assert nc["Placement"]["GroupName"], name
        nics = nc["NetworkInterfaces"]
        assert len(nics) == EFA_INTERFACES[nc["InstanceType"]], name  # one per network card
        assert all(nic["InterfaceType"] == "efa" for nic in nics)
        assert sorted(nic["NetworkCardIndex"] for nic in nics) == list(range(len(nics)))
        assert [nic["DeviceIndex"] for nic in nics if nic["NetworkCardIndex"] == 0] == [0]
        assert len({nic["SubnetId"] for nic in nics}) == 1  # EFA traffic does not cross subnets
    # Ray's own bootstrap step for NetworkInterfaces (no AWS calls) accepts them.
    _configure_from_network_interfaces(copy.deepcopy(config))
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert re.search(r"fi_info -p efa .*then export FI_PROVIDER=efa FI_EFA_USE_DEVICE_RDMA=1", worker_start)
    assert "ofi-nccl" in worker_start  # the plugin that lets NCCL use EFA


def test_gcp_gpu_nodes_use_gvnic_and_compact_placement():
    config = _load(ROOT / "configs" / "clusters" / "gcp.yaml")
    for name, t in config["available_node_types"].items():
        assert [nic["nicType"] for nic in t["node_config"]["networkInterfaces"]] == ["GVNIC"], name
    for name, t in _big_gpu_types(config).items():
        nc = t["node_config"]
        assert [p.rsplit("/", 1)[-1] for p in nc["resourcePolicies"]] == ["raylm-compact"], name
        assert isinstance(nc["scheduling"], dict), name  # the Compute API takes an object, not a list
        assert nc["scheduling"]["onHostMaintenance"] == "TERMINATE"  # required by GPUs and compact placement
    assert "--collocation=collocated" in (ROOT / "configs" / "clusters" / "gcp.yaml").read_text()


def test_azure_gpu_nodes_are_infiniband_skus_with_accelerated_networking():
    config = _load(ROOT / "configs" / "clusters" / "azure.yaml")
    for name, t in _big_gpu_types(config).items():
        arm = t["node_config"]["azure_arm_parameters"]
        assert re.fullmatch(r"Standard_ND96i?sr_H100_v5|Standard_ND96asr_v4", arm["vmSize"]), name  # r = RDMA/IB
        assert arm["enableAcceleratedNetworking"] is True and arm["imageOffer"] == "ubuntu-hpc"


def test_only_cluster_members_reach_ray_ports():
    """Ray binds some servers on all interfaces (Ray Serve's inter-deployment gRPC server, raylets), so each
    cloud's network rules must admit only the cluster's own nodes, plus SSH."""
    aws = _load(ROOT / "configs" / "clusters" / "aws.yaml")
    from ray.autoscaler._private.aws.config import _configure_from_network_interfaces

    # After Ray's own step every node type names a security group, so Ray creates none; it is the same one.
    aws_groups = {
        g for t in _configure_from_network_interfaces(aws)["available_node_types"].values()
        for g in t["node_config"]["SecurityGroupIds"]
    }  # fmt: skip
    assert len(aws_groups) == 1
    aws_text = (ROOT / "configs" / "clusters" / "aws.yaml").read_text()
    assert "--protocol all --source-group" in aws_text and "--port 22 --cidr YOUR-IP/32" in aws_text

    gcp = _load(ROOT / "configs" / "clusters" / "gcp.yaml")
    nodes = [t["node_config"] for t in gcp["available_node_types"].values()]
    assert all(n["tags"]["items"] == ["raylm"] for n in nodes)
    assert len({nic["subnetwork"] for n in nodes for nic in n["networkInterfaces"]}) == 1  # the raylm-net subnet
    gcp_text = (ROOT / "configs" / "clusters" / "gcp.yaml").read_text()
    assert "--allow=all --source-tags=raylm --target-tags=raylm" in gcp_text
    assert "--allow=tcp:22 --source-ranges=YOUR-IP/32" in gcp_text

    azure = _load(ROOT / "configs" / "clusters" / "azure.yaml")
    assert all(t["node_config"]["azure_arm_parameters"]["provisionPublicIp"] is False for t in _workers(azure).values())


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=[p.name for p in CLUSTER_FILES])
def test_no_credentials_in_the_file(path):
    text = path.read_text()
    for pattern in SECRET_PATTERNS:
        assert not re.search(pattern, text, re.IGNORECASE), f"{path.name} matches {pattern!r}"
    config = _load(path)
    provider = config["provider"]["type"]
    nodes = [t["node_config"] for t in config["available_node_types"].values()]
    if provider == "aws":  # storage through instance roles / service accounts / managed identities
        assert all("IamInstanceProfile" in n for n in nodes)
    elif provider == "gcp":
        assert all(n["serviceAccounts"][0]["email"] for n in nodes)
    else:
        assert config["provider"]["msi_name"]


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=[p.name for p in CLUSTER_FILES])
def test_dashboard_is_loopback_only_and_auth_is_on(path):
    config = _load(path)
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in path.read_text()
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    assert "/home/ubuntu/.ray/auth_token" in config["file_mounts"]  # every node gets the same token


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=[p.name for p in CLUSTER_FILES])
def test_setup_installs_from_the_lock_and_syncs_no_outputs(path):
    config = _load(path)
    setup = " ".join(config["setup_commands"])
    assert "python3.11 -m venv .venv" in setup  # the lock's numpy/scipy/pyarrow need Python >= 3.11
    assert ".venv/bin/pip install -q -r configs/clusters/requirements-lock.txt" in setup
    assert ".venv/bin/pip install -q --no-deps -e ." in setup  # raylm itself adds nothing beyond the lock
    assert setup.index("requirements-lock.txt") < setup.index("--no-deps -e .")
    assert ".venv/bin/ray start" in _start_commands(config)  # the locked Ray, not whatever the image has
    assert config["file_mounts"]["/home/ubuntu/raylm"] == "."
    for never in (".venv", "runs", "data"):
        assert never in config["rsync_exclude"]


def test_lock_pins_every_runtime_dependency_within_pyproject():
    pins = _lock_pins()
    lines = [ln for ln in LOCK.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(pins) == len(lines)  # no package twice
    for req in pins.values():  # exact pins only: no ranges, URLs or markers
        assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", str(req)
        assert req.url is None and req.marker is None, str(req)
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, dependencies):
        pin = pins.get(canonicalize_name(dep.name))
        assert pin is not None, f"{LOCK.name}: {dep.name} (pyproject.toml) is not pinned"
        version = Version(next(iter(pin.specifier)).version)
        assert version.local is None, f"{LOCK.name}: {pin} names a local build; pin the plain version"
        assert dep.specifier.contains(version, prereleases=True), f"{LOCK.name}: {pin} is outside {dep}"
        assert dep.extras <= pin.extras, f"{LOCK.name}: {pin} lacks the extras of {dep}"
