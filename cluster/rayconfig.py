"""``ray_config.yaml``: Ray's own cluster-launcher checks, then our instance, image and install rules.

Ray's ``validate_config`` is what ``ray up`` runs: ``ray-schema.json`` (the file check-jsonschema would be
given) plus the node-type bounds, on the config with Ray's defaults filled in; so no second schema run.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
from ray.autoscaler._private.util import prepare_config, validate_config

from cluster.pins import (
    REPO,
    ClusterConfigError,
    Pins,
    image_problems,
    json_path,
    load_yaml,
    project_pins,
    raise_problems,
)

# vCPUs and GPUs of the AWS instance types we size for (from the EC2 instance type pages).
AWS_INSTANCES: dict[str, tuple[int, int]] = {
    "m6i.xlarge": (4, 0),
    "m6i.2xlarge": (8, 0),
    "m6i.4xlarge": (16, 0),
    "g5.xlarge": (4, 1),
    "g5.2xlarge": (8, 1),
    "g5.12xlarge": (48, 4),
    "g5.48xlarge": (192, 8),
    "g6e.12xlarge": (48, 4),
    "p4d.24xlarge": (96, 8),
    "p4de.24xlarge": (96, 8),
    "p5.48xlarge": (192, 8),
    "p5e.48xlarge": (192, 8),
}


def validate_ray_config(source: Path | dict[str, Any] = REPO / "ray_config.yaml", pins: Pins | None = None) -> dict:
    """Check a Ray cluster launcher config; return it as ``ray up`` prepares it (defaults filled in)."""
    name = source.name if isinstance(source, Path) else "ray config"
    config = load_yaml(source) if isinstance(source, Path) else source
    pins = pins or project_pins()
    if not isinstance(config, dict):
        raise ClusterConfigError(f"{name}: expected a mapping at the top level")
    try:  # exactly what `ray up` runs before it talks to the cloud provider
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except jsonschema.ValidationError as err:
        raise ClusterConfigError(f"{name}: {json_path(err.absolute_path)}: {err.message}") from None
    except KeyError as err:
        raise ClusterConfigError(f"{name}: missing required field {err}") from None
    except (ValueError, RuntimeError) as err:
        raise ClusterConfigError(f"{name}: {err}") from None

    problems: list[str] = []
    docker = prepared.get("docker") or {}
    images = {k: docker[k] for k in ("image", "head_image", "worker_image") if k in docker}
    if not images:
        problems.append(f"{name}: docker: no image; every node must run the pluristeer image")
    for key, image in images.items():
        problems += image_problems(image, f"{name}: docker.{key}", pins)
    if prepared["provider"]["type"] == "aws":
        for type_name, node in prepared["available_node_types"].items():
            problems += _aws_node_problems(f"{name}: available_node_types.{type_name}", node)
    if not any("pip install" in cmd and "pluristeer" in cmd for cmd in prepared["setup_commands"]):
        problems.append(f"{name}: setup_commands: no command installs pluristeer (pip install ... pluristeer)")
    raise_problems(problems)
    return prepared


def _aws_node_problems(where: str, node: dict[str, Any]) -> list[str]:
    instance = node["node_config"].get("InstanceType")
    if instance not in AWS_INSTANCES:
        return [f"{where}: InstanceType {instance!r} is not one we size for: {sorted(AWS_INSTANCES)}"]
    cpus, gpus = AWS_INSTANCES[instance]
    resources = node["resources"]
    problems = []
    if resources.get("CPU", cpus) > cpus:
        problems.append(f"{where}: resources.CPU {resources['CPU']} exceeds the {cpus} vCPUs of {instance}")
    if resources.get("GPU", gpus) != gpus:
        problems.append(f"{where}: resources.GPU {resources.get('GPU')} but {instance} has {gpus} GPUs")
    return problems
