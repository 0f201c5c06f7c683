"""Every manifest in cluster/k8s through the real check-jsonschema and the operator's, Ray's and Serve's rules.

The broken documents below are written to one directory and checked in a single check-jsonschema run
(one process, not one per case); a case's problems are the schema's, or, when it passes, our rules'.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.manifests import (
    CRDS,
    K8S_DEFS,
    MANIFEST_SCHEMA,
    entrypoint_problems,
    manifest_problems,
    schema_problems,
    validate_manifests,
)
from cluster.pins import HERE, ClusterConfigError, project_pins, tool

K8S = HERE / "k8s"
PINS = project_pins()
HEAD = "spec.headGroupSpec.template.spec.containers.0"
WORKER = "spec.workerGroupSpecs.0"


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((K8S / name).read_text())


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    keys = [int(k) if k.isdigit() else k for k in re.split(r"\.(?![^/]*/)", path)]  # keeps "ray.io/x" whole
    node = doc
    for key in keys[:-1]:
        node = node[key]
    if value is None:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return doc


def _with_serve(change: Callable[[list[dict[str, Any]]], Any]) -> dict[str, Any]:
    doc = _load("rayservice.yaml")
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    change(serve["applications"][0]["deployments"])
    return _set(doc, "spec.serveConfigV2", yaml.safe_dump(serve))


def _cluster(path: str, value: Any) -> dict[str, Any]:
    return _set(_load("raycluster.yaml"), path, value)


def _job(path: str, value: Any) -> dict[str, Any]:
    return _set(_load("rayjob-train.yaml"), path, value)


def _twice(doc: dict[str, Any]) -> dict[str, Any]:
    doc["spec"]["workerGroupSpecs"].append(copy.deepcopy(doc["spec"]["workerGroupSpecs"][0]))
    return doc


def _sidecar(image: str) -> dict[str, Any]:
    doc = _load("raycluster.yaml")
    doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"].append({"name": "logs", "image": image})
    return doc


CLI = f"python -m {PINS.script[1].partition(':')[0]}"  # the console script's module, as pyproject names it
CASES: dict[str, tuple[Callable[[], dict[str, Any]], str]] = {
    # the schema (check-jsonschema)
    "typo": (lambda: _cluster(f"{HEAD}.imagePullPolicyy", "Always"), "'imagePullPolicyy' was unexpected"),
    "type": (lambda: _cluster(f"{WORKER}.maxReplicas", "4"), "maxReplicas: '4' is not of type 'integer'"),
    "required": (lambda: _cluster("spec.headGroupSpec", None), "spec: 'headGroupSpec' is a required property"),
    "enum": (
        lambda: _cluster("spec.autoscalerOptions.upscalingMode", "Fast"),
        "'Fast' is not one of ['Default', 'Aggressive', 'Conservative']",
    ),
    "api": (lambda: _cluster("apiVersion", "ray.io/v1alpha1"), "apiVersion: 'ray.io/v1' was expected"),
    "kind": (lambda: _cluster("kind", "Deployment"), "kind: 'Deployment' is not one of"),
    "mode": (lambda: _job("spec.submissionMode", "K8sMode"), "'K8sMode' is not one of"),
    "ttl": (lambda: _job("spec.ttlSecondsAfterFinished", -1), "-1 is less than the minimum of 0"),
    "pvc": (
        lambda: _set(_load("storage.yaml"), "spec.accesModes", ["ReadWriteMany"]),
        "spec: Additional properties are not allowed ('accesModes' was unexpected)",
    ),
    # our rules, the operator's and Ray's
    "bounds": (lambda: _cluster(f"{WORKER}.minReplicas", 5), "need 0 <= minReplicas (5) <= maxReplicas (4)"),
    "ray": (lambda: _cluster("spec.rayVersion", "2.9.0"), "must equal ray in requirements.lock (2.60.0)"),
    "gpu": (
        lambda: _cluster(f"{WORKER}.template.spec.containers.0.image", "pluristeer/pluristeer:0.1.0-cpu"),
        "not a -cuda image",
    ),
    "autoscaler": (
        lambda: _cluster("spec.headGroupSpec.rayStartParams.num-cpus", "zero"),
        "the Ray autoscaler cannot read this spec",
    ),
    "groups": (lambda: _twice(_load("raycluster.yaml")), "groupName 'gpu-a100' is used more than once"),
    "sidecar": (lambda: _sidecar("fluent/fluent-bit"), "containers[1]: image 'fluent/fluent-bit' must be pinned"),
    "both": (lambda: _job("spec.clusterSelector", {"ray.io/cluster": "pluristeer"}), "set exactly one of rayCluster"),
    "script": (lambda: _job("spec.entrypoint", "python train.py"), "must run our CLI: 'pluristeer <command>"),
    "join": (
        lambda: _job("spec.entrypoint", "pluristeer train --config /etc/pluristeer/train.yaml"),
        "must join the job's cluster: add --address auto",
    ),
    "command": (lambda: _job("spec.entrypoint", "pluristeer trian --address auto"), "the command must be one of"),
    "option": (lambda: _job("spec.entrypoint", f"{CLI} train --confg x --address auto"), "has no option --confg"),
    "env": (lambda: _job("spec.runtimeEnvYAML", "env_varz: {A: b}"), "unknown runtime_env fields ['env_varz']"),
    "env_type": (lambda: _job("spec.runtimeEnvYAML", "env_vars: {A: 1}"), "must be of type Dict[str, str]"),
    "replicas": (
        lambda: _job("spec.rayClusterSpec.workerGroupSpecs.0.replicas", 9),
        "outside [minReplicas, maxReplicas]",
    ),
    "selector": (
        lambda: _set(_load("rayjob-evaluate.yaml"), "spec.clusterSelector", {"app": "pluristeer"}),
        "must name the RayCluster as ray.io/cluster",
    ),
    # Ray Serve's schema for serveConfigV2
    "serve_key": (
        lambda: _with_serve(lambda ds: ds[1]["autoscaling_config"].update(target_ongoing_request=4)),
        "unknown keys ['target_ongoing_request']",
    ),
    "serve_dep": (
        lambda: _with_serve(lambda ds: ds[0].update(max_ongoing_reqs=3)),
        "(PluralAggregator): unknown keys ['max_ongoing_reqs']",
    ),
    "serve_bounds": (
        lambda: _with_serve(lambda ds: ds[2]["autoscaling_config"].update(min_replicas=9)),
        "must be greater than or equal to min_replicas (9)",
    ),
    "serve_scaling": (lambda: _with_serve(lambda ds: ds[3].pop("autoscaling_config")), "set autoscaling_config"),
    "serve_both": (lambda: _with_serve(lambda ds: ds[0].update(num_replicas=2)), "num_replicas"),
}


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Each case's problems: check-jsonschema's (one run over all cases), else those of our rules."""
    root = tmp_path_factory.mktemp("manifests")
    docs = {name: build() for name, (build, _) in CASES.items()}
    for name, doc in docs.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    report = schema_problems([root / f"{name}.yaml" for name in CASES])
    return {n: report[root / f"{n}.yaml"] or manifest_problems(docs[n], f"{n}.yaml", PINS) for n in CASES}


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_manifest_is_rejected(checked: dict[str, list[str]], case: str) -> None:
    problems = checked[case]
    assert any(CASES[case][1] in p for p in problems), problems
    assert all(p.startswith(case) for p in problems), problems  # every problem names the file first


def test_vendored_schemas_are_valid_and_documented() -> None:
    schemas = [str(p) for p in (MANIFEST_SCHEMA, CRDS / "ray.io_v1.schema.yaml", K8S_DEFS)]
    proc = subprocess.run(
        [tool("check-jsonschema", "check-jsonschema"), "--check-metaschema", *schemas], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "io.k8s.api.core.v1.PodTemplateSpec" in json.loads(K8S_DEFS.read_text())["$defs"]
    readme = (CRDS / "README.md").read_text()
    assert hashlib.sha256(K8S_DEFS.read_bytes()).hexdigest() in readme  # provenance stays honest


def test_repo_manifests_are_valid_and_complete() -> None:
    paths = sorted(K8S.glob("*.yaml"))
    assert all(found == [] for found in schema_problems(paths).values())
    for path in paths:
        assert manifest_problems(yaml.safe_load(path.read_text()), path.name, PINS) == [], path.name
    assert validate_manifests(K8S, PINS) == 7
    kinds = {(d["kind"], d["metadata"]["name"]) for d in map(yaml.safe_load, map(Path.read_text, paths))}
    assert kinds == {
        ("PersistentVolumeClaim", "pluristeer-data"),
        ("RayCluster", "pluristeer"),
        ("RayJob", "pluristeer-collect"),
        ("RayJob", "pluristeer-train"),
        ("RayJob", "pluristeer-train-s3"),
        ("RayJob", "pluristeer-evaluate"),
        ("RayService", "pluristeer-serve"),
    }
    for stage in ("collect", "train", "evaluate"):
        entry = _load(f"rayjob-{stage}.yaml")["spec"]["entrypoint"]
        assert entry.startswith(f"pluristeer {stage} --config ") and entry.endswith("--address auto")
    # the object-storage variant: no shared volume, the AWS variables from the pluristeer-s3 Secret in every pod
    s3 = _load("rayjob-train-s3.yaml")["spec"]
    assert s3["entrypoint"].startswith("pluristeer train --config ") and "pluristeer-data" not in json.dumps(s3)
    cluster = s3["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL"):
            assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "pluristeer-s3", name
    # the evaluate job runs on the long-lived RayCluster by name
    assert _load("rayjob-evaluate.yaml")["spec"]["clusterSelector"] == {"ray.io/cluster": "pluristeer"}


def test_entrypoints_are_commands_of_the_console_script() -> None:
    for entry in ("pluristeer train --address auto", f"{CLI} collect --set k=1 --address=auto"):
        assert entrypoint_problems(entry, "x", PINS) == [], entry
    (problem,) = entrypoint_problems("pluristeer data --address auto", "x", PINS)  # `data` takes no --address
    commands = "['collect', 'evaluate', 'explain', 'recommend', 'serve', 'train', 'vectors']"
    assert f"the command must be one of {commands}" in problem


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


def test_rayservice_needs_a_serve_config() -> None:
    problems = manifest_problems(_set(_load("rayservice.yaml"), "spec.serveConfigV2", None), "test.yaml", PINS)
    assert problems == [
        "test.yaml: RayService/pluristeer-serve: spec.serveConfigV2: empty; the RayService has nothing to deploy"
    ]


def test_directory_with_a_broken_manifest_fails(tmp_path: Path) -> None:
    (tmp_path / "ok.yaml").write_text((K8S / "storage.yaml").read_text())
    (tmp_path / "bad.yaml").write_text(
        "apiVersion: ray.io/v1\nkind: RayJob\nmetadata: {name: x}\nspec: {entrypoint: 3}\n"
    )
    storage = (K8S / "storage.yaml").read_text()
    (tmp_path / "two.yaml").write_text(f"{storage}---\n{storage}")
    with pytest.raises(ClusterConfigError) as err:
        validate_manifests(tmp_path, PINS)
    lines = str(err.value).splitlines()  # ok.yaml passes and is not mentioned
    assert len(lines) == 2 and lines[0] == "bad.yaml: spec.entrypoint: 3 is not of type 'string'"
    assert lines[1].startswith("two.yaml: not one valid YAML document: expected a single document in the stream")
