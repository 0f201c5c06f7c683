"""Static checks of the scale-out configuration, with no cluster, container engine or network.

- ``ray_config.yaml``: Ray's own cluster-launcher checks (``prepare_config`` + ``validate_config``, i.e.
  ``ray-schema.json`` and the node-type bounds), then ours: known AWS instance types whose CPU/GPU
  counts match the advertised resources, our images pinned to this version, a setup command that
  installs pluristeer.
- ``cluster/k8s/*.yaml``: each document against the KubeRay ``ray.io/v1`` schema (``cluster/crds/``,
  Kubernetes core types strict), then the operator's own rules (replica bounds, unique group names,
  RayJob cluster choice), Ray's derivation of the autoscaling config from the cluster spec, and for
  RayService the Serve config through Ray Serve's schema with unknown keys rejected.
- ``cluster/Dockerfile*``: base images pinned by tag, torch / Ray / Python matching ``requirements.lock``
  and ``pyproject.toml``, the install steps of the README, a non-root user, a context filter.

``python -m cluster.validate`` runs all of it and exits non-zero on any problem.
"""

from __future__ import annotations

import sys

from cluster.dockerfile import validate_dockerfiles
from cluster.manifests import validate_manifests
from cluster.pins import HERE, REPO, ClusterConfigError, project_pins
from cluster.rayconfig import validate_ray_config


def main() -> int:
    """Run every check; print what passed and every problem; exit code 1 on any problem."""
    pins = project_pins()
    failed = False
    checks = [
        ("ray_config.yaml", lambda: validate_ray_config(REPO / "ray_config.yaml", pins) and 1),
        ("cluster/k8s", lambda: validate_manifests(HERE / "k8s", pins)),
        ("cluster/Dockerfile*", lambda: validate_dockerfiles(HERE, pins)),
    ]
    for name, check in checks:
        try:
            count = check()
            print(f"ok  {name} ({count} checked)")
        except ClusterConfigError as err:
            failed = True
            print(f"FAIL {name}\n  " + str(err).replace("\n", "\n  "))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
