"""Every shipped Ray cluster-launcher file passes Ray's own schema validation."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
CLUSTER_FILES = [ROOT / "cluster.yaml", *sorted((ROOT / "configs" / "clusters").glob("*.yaml"))]


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=[p.name for p in CLUSTER_FILES])
def test_cluster_file_is_valid(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(config)  # raises on a schema violation
    assert config["head_node_type"] in config["available_node_types"]
    text = path.read_text().lower()
    assert "aws_access_key_id" not in text and "aws_secret_access_key" not in text  # roles only
