"""Every manifest in cluster/k8s against the KubeRay schema and the operator's, Ray's and Serve's rules."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from cluster.manifests import (
    K8S_DEFS,
    RAY_SCHEMA,
    iter_manifests,
    manifest_problems,
    schema_problems,
    validate_manifests,
)
from cluster.pins import HERE, ClusterConfigError, project_pins

K8S = HERE / "k8s"
PINS = project_pins()


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((K8S / name).read_text())


def _problems(doc: dict[str, Any]) -> list[str]:
    return manifest_problems(doc, "test.yaml", PINS)


def test_vendored_schemas_are_valid_and_documented() -> None:
    Draft202012Validator.check_schema(yaml.safe_load(RAY_SCHEMA.read_text()))
    k8s = json.loads(K8S_DEFS.read_text())
    Draft202012Validator.check_schema(k8s)
    assert "io.k8s.api.core.v1.PodTemplateSpec" in k8s["$defs"]
    readme = (HERE / "crds" / "README.md").read_text()
    assert hashlib.sha256(K8S_DEFS.read_bytes()).hexdigest() in readme  # provenance stays honest


@pytest.mark.parametrize("name", sorted(p.name for p in K8S.glob("*.yaml")))
def test_repo_manifest_is_valid(name: str) -> None:
    docs = [doc for where, doc in iter_manifests(K8S) if where.split("#")[0] == name]
    assert docs
    for doc in docs:
        assert _problems(doc) == []


def test_manifest_set_is_complete() -> None:
    assert validate_manifests(K8S, PINS) == 6
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in iter_manifests(K8S)}
    assert kinds == {
        ("PersistentVolumeClaim", "pluristeer-data"),
        ("RayCluster", "pluristeer"),
        ("RayJob", "pluristeer-collect"),
        ("RayJob", "pluristeer-train"),
        ("RayJob", "pluristeer-evaluate"),
        ("RayService", "pluristeer-serve"),
    }
    for stage in ("collect", "train", "evaluate"):
        entry = _load(f"rayjob-{stage}.yaml")["spec"]["entrypoint"]
        assert entry.startswith(f"pluristeer {stage} --config ") and entry.endswith("--address auto")
    # the evaluate job runs on the long-lived RayCluster by name
    assert _load("rayjob-evaluate.yaml")["spec"]["clusterSelector"] == {"ray.io/cluster": "pluristeer"}


def test_rayservice_autoscales_every_deployment_on_its_own() -> None:
    serve = yaml.safe_load(_load("rayservice.yaml")["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == "serve.app:build_app"
    deployments = {d["name"]: d for d in app["deployments"]}
    perspectives = [n for n in deployments if n.startswith("PerspectiveModel-")]
    assert {"PluralAggregator", "BaseModel"} <= set(deployments) and len(perspectives) >= 2
    bounds = {
        n: (d["autoscaling_config"]["min_replicas"], d["autoscaling_config"]["max_replicas"])
        for n, d in deployments.items()
    }
    assert len({bounds[n] for n in perspectives}) > 1  # per-perspective, not one shared setting


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    keys = [int(k) if k.isdigit() else k for k in re.split(r"\.", path)]
    node = doc
    for key in keys[:-1]:
        node = node[key]
    if value is None:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return doc


HEAD = "spec.headGroupSpec.template.spec.containers.0"
WORKER = "spec.workerGroupSpecs.0"


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (f"{HEAD}.imagePullPolicyy", "Always", "'imagePullPolicyy' was unexpected"),
        (f"{WORKER}.maxReplicas", "4", "maxReplicas: '4' is not of type 'integer'"),
        ("spec.headGroupSpec", None, "spec: 'headGroupSpec' is a required property"),
        (
            "spec.autoscalerOptions.upscalingMode",
            "Fast",
            "'Fast' is not one of ['Default', 'Aggressive', 'Conservative']",
        ),
        (f"{WORKER}.minReplicas", 5, "need 0 <= minReplicas (5) <= maxReplicas (4)"),
        ("spec.rayVersion", "2.9.0", "must equal ray in requirements.lock (2.60.0)"),
        (f"{WORKER}.template.spec.containers.0.image", "pluristeer/pluristeer:0.1.0-cpu", "not a -cuda image"),
        ("spec.headGroupSpec.rayStartParams.num-cpus", "zero", "the Ray autoscaler cannot read this spec"),
        ("apiVersion", "ray.io/v1alpha1", "unsupported apiVersion/kind"),
    ],
)
def test_broken_raycluster_is_rejected(path: str, value: Any, message: str) -> None:
    problems = _problems(_set(_load("raycluster.yaml"), path, value))
    assert any(message in p for p in problems), problems


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("spec.clusterSelector", {"ray.io/cluster": "pluristeer"}, "set exactly one of rayClusterSpec"),
        ("spec.entrypoint", "python train.py", "must run a stage and join the cluster"),
        ("spec.entrypoint", "pluristeer train --config /etc/pluristeer/train.yaml", "must run a stage and join"),
        ("spec.submissionMode", "K8sMode", "'K8sMode' is not one of"),
        ("spec.runtimeEnvYAML", "env_varz: {A: b}", "unknown runtime_env fields ['env_varz']"),
        ("spec.runtimeEnvYAML", "env_vars: {A: 1}", "must be of type Dict[str, str]"),
        ("spec.rayClusterSpec.workerGroupSpecs.0.replicas", 9, "outside [minReplicas, maxReplicas]"),
    ],
)
def test_broken_rayjob_is_rejected(path: str, value: Any, message: str) -> None:
    problems = _problems(_set(_load("rayjob-train.yaml"), path, value))
    assert any(message in p for p in problems), problems


def _with_serve(change: Any) -> dict[str, Any]:
    doc = _load("rayservice.yaml")
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    change(serve["applications"][0]["deployments"])
    return _set(doc, "spec.serveConfigV2", yaml.safe_dump(serve))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda ds: ds[1]["autoscaling_config"].update(target_ongoing_request=4),
            "unknown keys ['target_ongoing_request']",
        ),
        (lambda ds: ds[0].update(max_ongoing_reqs=3), "(PluralAggregator): unknown keys ['max_ongoing_reqs']"),
        (
            lambda ds: ds[2]["autoscaling_config"].update(min_replicas=9),
            "must be greater than or equal to min_replicas (9)",
        ),
        (lambda ds: ds[3].pop("autoscaling_config"), "set autoscaling_config (or num_replicas)"),
        (lambda ds: ds[0].update(num_replicas=2), "num_replicas"),
    ],
)
def test_broken_serve_config_is_rejected(change: Any, message: str) -> None:
    problems = _problems(_with_serve(change))
    assert any(message in p for p in problems), problems


def test_rayservice_needs_a_serve_config() -> None:
    problems = _problems(_set(_load("rayservice.yaml"), "spec.serveConfigV2", None))
    assert problems == [
        "test.yaml: RayService/pluristeer-serve: spec.serveConfigV2: empty; the RayService has nothing to deploy"
    ]


def test_broken_pvc_is_rejected() -> None:
    doc = _set(_load("storage.yaml"), "spec.accesModes", ["ReadWriteMany"])
    assert schema_problems(doc, "storage.yaml") == [
        "storage.yaml: spec: Additional properties are not allowed ('accesModes' was unexpected)"
    ]


def test_directory_with_a_broken_manifest_fails(tmp_path: Path) -> None:
    (tmp_path / "ok.yaml").write_text((K8S / "storage.yaml").read_text())
    (tmp_path / "bad.yaml").write_text(
        "apiVersion: ray.io/v1\nkind: RayJob\nmetadata: {name: x}\nspec: {entrypoint: 3}\n"
    )
    with pytest.raises(ClusterConfigError, match=r"bad.yaml: RayJob/x: spec.entrypoint: 3 is not of type 'string'"):
        validate_manifests(tmp_path, PINS)


def test_duplicate_worker_groups_and_sidecars() -> None:
    doc = _load("raycluster.yaml")
    group = doc["spec"]["workerGroupSpecs"][0]
    doc["spec"]["workerGroupSpecs"].append(copy.deepcopy(group))
    assert any("groupName 'gpu-a100' is used more than once" in p for p in _problems(doc))
    doc = _load("raycluster.yaml")
    containers = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    containers.append({"name": "logs", "image": "fluent/fluent-bit:3.2.1"})
    assert _problems(doc) == []  # a pinned sidecar is fine
    containers[-1]["image"] = "fluent/fluent-bit"
    assert any("containers[1]: image 'fluent/fluent-bit' must be pinned by a tag" in p for p in _problems(doc))
