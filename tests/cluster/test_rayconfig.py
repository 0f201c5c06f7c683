"""ray_config.yaml through Ray's own cluster-launcher validation (ray-schema.json) and our rules."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.pins import REPO, ClusterConfigError
from cluster.rayconfig import validate_ray_config

CONFIG = REPO / "ray_config.yaml"


def _config() -> dict[str, Any]:
    return yaml.safe_load(CONFIG.read_text())


def test_repo_config_passes_ray_validation() -> None:
    prepared = validate_ray_config(CONFIG)
    nodes = prepared["available_node_types"]
    assert prepared["provider"]["type"] == "aws"
    assert nodes[prepared["head_node_type"]]["max_workers"] == 0  # Ray fills this in for the head
    gpu_types = {n: t for n, t in nodes.items() if t["resources"].get("GPU", 0) > 0}
    assert {t["node_config"]["InstanceType"].split(".")[0] for t in gpu_types.values()} == {"g5", "p4d", "p5"}
    assert all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu_types.values())
    # Ray merges the shared setup commands into the head's and the workers' lists
    assert any("pluristeer" in c for c in prepared["worker_setup_commands"])
    assert prepared["docker"]["worker_image"].endswith(":0.1.0-cuda")


def test_broken_file_copy_fails_with_a_clear_message(tmp_path: Path) -> None:
    config = _config()
    config["available_node_types"]["gpu_a100"]["min_worker"] = 1  # typo of min_workers
    broken = tmp_path / "ray_config.yaml"
    broken.write_text(yaml.safe_dump(config))
    with pytest.raises(ClusterConfigError) as err:
        validate_ray_config(broken)
    assert str(err.value) == (
        "ray_config.yaml: available_node_types.gpu_a100: "
        "Additional properties are not allowed ('min_worker' was unexpected)"
    )


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["available_node_types", "gpu_a100", "resources", "GPU"], "8", "GPU: '8' is not of type 'integer'"),
        (["max_workers"], "eight", "max_workers: 'eight' is not of type 'integer'"),
        (["head_node_type"], "main", "`head_node_type` must be one of `available_node_types`"),
        (["available_node_types", "gpu_h100", "min_workers"], 9, "smaller than the sum of `min_workers`"),
        (["available_node_types", "gpu_a100", "resources", "GPU"], 4, "GPU 4 but p4d.24xlarge has 8 GPUs"),
        (["available_node_types", "head", "node_config", "InstanceType"], "t2.micro", "not one we size for"),
        (["docker", "worker_image"], "rayproject/ray:latest", "is not the pluristeer image"),
        (["docker", "head_image"], "pluristeer/pluristeer:0.0.1-cpu", "must be one of ['0.1.0-cpu', '0.1.0-cuda']"),
        (["setup_commands"], [], "no command installs pluristeer"),
    ],
)
def test_broken_configs_are_rejected(path: list[str], value: Any, message: str) -> None:
    config = copy.deepcopy(_config())
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ClusterConfigError) as err:
        validate_ray_config(config)
    assert message in str(err.value)


def test_missing_provider_names_the_field() -> None:
    config = _config()
    del config["provider"]
    with pytest.raises(ClusterConfigError, match="missing required field 'provider'"):
        validate_ray_config(config)
