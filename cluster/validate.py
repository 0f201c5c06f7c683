"""Static checks of the scale-out configuration, with no cluster, container engine or network.

- ``ray_config.yaml``: Ray's own cluster-launcher checks (``prepare_config`` + ``validate_config``: Ray's
  ``ray-schema.json`` and the node-type bounds), then ours (:mod:`cluster.rayconfig`).
- ``cluster/k8s/*.yaml``: check-jsonschema against ``cluster/crds/manifests.schema.yaml`` (KubeRay
  ``ray.io/v1`` and Kubernetes core types, unknown fields rejected), then what a schema cannot state
  (:mod:`cluster.manifests`: pins, replica bounds, entrypoints, Ray's autoscaler, RuntimeEnv, Serve schemas).
- ``cluster/Dockerfile*``: hadolint (``cluster/.hadolint.yaml``), then the pins and install steps
  (:mod:`cluster.dockerfile`).

``python -m cluster.validate`` (``make cluster-check``) runs all of it and exits non-zero on any problem.
"""

from __future__ import annotations

import sys

from cluster.dockerfile import validate_dockerfiles
from cluster.manifests import validate_manifests
from cluster.pins import HERE, REPO, ClusterConfigError, project_pins
from cluster.rayconfig import validate_ray_config


def main() -> int:
    """Run every check; print what passed and every problem; exit code 1 on any problem."""
    failed = False
    checks = [
        ("ray_config.yaml", lambda pins: validate_ray_config(REPO / "ray_config.yaml", pins) and 1),
        ("cluster/k8s", lambda pins: validate_manifests(HERE / "k8s", pins)),
        ("cluster/Dockerfile*", lambda pins: validate_dockerfiles(HERE, pins)),
    ]
    try:
        pins = project_pins()
    except ClusterConfigError as err:
        print(f"FAIL pins\n  {err}")
        return 1
    for name, check in checks:
        try:
            print(f"ok  {name} ({check(pins)} checked)")
        except ClusterConfigError as err:
            failed = True
            print(f"FAIL {name}\n  " + str(err).replace("\n", "\n  "))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
