"""The vendored Kubernetes definitions are exactly the $ref closure of the roots the script names."""

from __future__ import annotations

import json

from cluster.crds.extract_k8s_defs import ROOTS, closure
from cluster.manifests import K8S_DEFS


def test_vendored_defs_are_closed_under_ref() -> None:
    defs = json.loads(K8S_DEFS.read_text())["$defs"]
    assert set(closure(defs, ROOTS)) == set(defs)  # nothing missing (no dangling $ref), nothing extra


def test_closure_follows_refs() -> None:
    defs = {"a": {"$ref": "#/$defs/b"}, "b": {"properties": {"x": {"$ref": "#/$defs/c"}}}, "c": {}, "d": {}}
    assert list(closure(defs, ["a"])) == ["a", "b", "c"]
