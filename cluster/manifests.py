"""KubeRay manifests: the ray.io/v1 schema, the operator's rules, Ray's autoscaler and Serve schemas."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from cluster.pins import (
    GPU_RESOURCE,
    HERE,
    ClusterConfigError,
    Pins,
    image_problems,
    json_path,
    project_pins,
    raise_problems,
)

CRDS = HERE / "crds"
K8S_DEFS = CRDS / "k8s-v1.33.0-defs.json"
RAY_SCHEMA = CRDS / "ray.io_v1.schema.yaml"
K8S_DEFS_ID = "https://kubernetes.io/api/_definitions.json"


@functools.cache
def _registry() -> Any:
    from referencing import Registry, Resource

    k8s = Resource.from_contents(json.loads(K8S_DEFS.read_text()))
    ray = Resource.from_contents(yaml.safe_load(RAY_SCHEMA.read_text()))
    return Registry().with_resources([(K8S_DEFS_ID, k8s), (ray.id(), ray)])


@functools.cache
def _validator(ref: str) -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator({"$ref": ref}, registry=_registry())


SCHEMAS = {
    ("ray.io/v1", "RayCluster"): "urn:pluristeer:kuberay:ray.io-v1#/$defs/RayCluster",
    ("ray.io/v1", "RayJob"): "urn:pluristeer:kuberay:ray.io-v1#/$defs/RayJob",
    ("ray.io/v1", "RayService"): "urn:pluristeer:kuberay:ray.io-v1#/$defs/RayService",
    ("v1", "PersistentVolumeClaim"): f"{K8S_DEFS_ID}#/$defs/io.k8s.api.core.v1.PersistentVolumeClaim",
}


def schema_problems(doc: dict[str, Any], where: str) -> list[str]:
    """Errors of ``doc`` against the schema of its ``apiVersion``/``kind``, one line each."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in SCHEMAS:
        return [f"{where}: unsupported apiVersion/kind {key}; supported: {sorted(SCHEMAS)}"]
    errors = sorted(_validator(SCHEMAS[key]).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{where}: {json_path(e.absolute_path)}: {_short(e)}" for e in errors]


def _short(err: Any, limit: int = 300) -> str:
    message = err.message
    if err.context:  # a failed oneOf/anyOf: name the branch that came closest
        from jsonschema.exceptions import best_match

        message = best_match(err.context).message
    return message if len(message) <= limit else message[:limit] + "..."


def manifest_problems(doc: Any, where: str, pins: Pins | None = None) -> list[str]:
    """Everything wrong with one manifest document (empty when it is fine)."""
    pins = pins or project_pins()
    if not isinstance(doc, dict):
        return [f"{where}: expected a mapping, got {type(doc).__name__}"]
    name = doc.get("metadata", {}).get("name") if isinstance(doc.get("metadata"), dict) else None
    problems = schema_problems(doc, f"{where}: {doc.get('kind')}/{name}" if name else where)
    if problems or doc["apiVersion"] != "ray.io/v1":
        return problems  # the rules below assume the shape the schema guarantees
    where = f"{where}: {doc['kind']}/{doc['metadata']['name']}"
    spec = doc["spec"]
    if doc["kind"] == "RayCluster":
        problems += cluster_spec_problems(spec, f"{where}: spec", doc["metadata"]["name"], pins)
    elif doc["kind"] == "RayJob":
        problems += rayjob_problems(spec, f"{where}: spec", doc["metadata"]["name"], pins)
    else:
        problems += cluster_spec_problems(spec["rayClusterConfig"], f"{where}: spec.rayClusterConfig", "serve", pins)
        problems += serve_config_problems(spec.get("serveConfigV2"), f"{where}: spec.serveConfigV2")
    return problems


def _containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    return template.get("spec", {}).get("containers", [])


def cluster_spec_problems(spec: dict[str, Any], where: str, name: str, pins: Pins) -> list[str]:
    """The operator's and the Ray autoscaler's rules for a RayClusterSpec, and our image policy."""
    problems = []
    if spec.get("rayVersion") != pins.ray:
        problems.append(
            f"{where}.rayVersion: {spec.get('rayVersion')!r} must equal ray in requirements.lock ({pins.ray})"
        )
    groups = [("headGroupSpec", spec["headGroupSpec"])]
    groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(spec.get("workerGroupSpecs", []))]
    names = [g["groupName"] for _, g in groups[1:]]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{where}.workerGroupSpecs: groupName {dup!r} is used more than once")
    for path, group in groups:
        at = f"{where}.{path}"
        containers = _containers(group["template"])
        if not containers:
            problems.append(f"{at}.template.spec.containers: empty; the first container runs Ray")
            continue
        ray_container = containers[0]  # KubeRay runs Ray in the first container; others are sidecars
        problems += image_problems(ray_container.get("image"), f"{at}.template.spec.containers[0]", pins)
        for i, sidecar in enumerate(containers[1:], 1):
            image = str(sidecar.get("image", ""))
            if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
                problems.append(f"{at}.template.spec.containers[{i}]: image {image!r} must be pinned by a tag")
        gpus = ray_container.get("resources", {}).get("limits", {}).get(GPU_RESOURCE)
        if gpus and not str(ray_container.get("image", "")).endswith("-cuda"):
            problems.append(f"{at}: requests {GPU_RESOURCE} but runs {ray_container.get('image')!r}, not a -cuda image")
        if path != "headGroupSpec":
            low, high = group["minReplicas"], group["maxReplicas"]
            if not 0 <= low <= high:
                problems.append(f"{at}: need 0 <= minReplicas ({low}) <= maxReplicas ({high})")
            elif "replicas" in group and not low <= group["replicas"] <= high:
                problems.append(f"{at}.replicas: {group['replicas']} is outside [minReplicas, maxReplicas]")
    if problems:
        return problems
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    try:  # what the in-tree autoscaler does with this spec (resources from rayStartParams and limits)
        _derive_autoscaling_config_from_ray_cr({"metadata": {"name": name, "namespace": "default"}, "spec": spec})
    except Exception as err:  # Ray raises ValueError, KeyError, AssertionError or jsonschema errors here
        problems.append(f"{where}: the Ray autoscaler cannot read this spec: {type(err).__name__}: {err}")
    return problems


STAGE_ENTRYPOINT = re.compile(
    r"^pluristeer (collect|train|vectors|evaluate) .*(--address[ =]auto|--set ray_address=auto)\b"
)


def rayjob_problems(spec: dict[str, Any], where: str, name: str, pins: Pins) -> list[str]:
    """The operator's RayJob rules (cluster choice, entrypoint) and a usable runtime environment."""
    problems = []
    own, selector = "rayClusterSpec" in spec, "clusterSelector" in spec
    if own == selector:
        problems.append(f"{where}: set exactly one of rayClusterSpec (own cluster) or clusterSelector (existing)")
    if selector and "ray.io/cluster" not in spec["clusterSelector"]:
        problems.append(f"{where}.clusterSelector: must name the RayCluster as ray.io/cluster: <name>")
    if selector and spec.get("shutdownAfterJobFinishes"):
        problems.append(f"{where}.shutdownAfterJobFinishes: true would shut down a cluster this job does not own")
    if spec.get("submissionMode", "K8sJobMode") != "InteractiveMode" and not STAGE_ENTRYPOINT.match(
        spec.get("entrypoint", "")
    ):
        problems.append(
            f"{where}.entrypoint: {spec.get('entrypoint')!r} must run a stage and join the cluster: "
            "'pluristeer <stage> ... --address auto'"
        )
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        problems.append(f"{where}.ttlSecondsAfterFinished: must be >= 0")
    problems += runtime_env_problems(spec.get("runtimeEnvYAML"), f"{where}.runtimeEnvYAML")
    if own:
        problems += cluster_spec_problems(spec["rayClusterSpec"], f"{where}.rayClusterSpec", name, pins)
    return problems


def runtime_env_problems(text: str | None, where: str) -> list[str]:
    if text is None:
        return []
    from ray.runtime_env import RuntimeEnv

    try:
        env = yaml.safe_load(text)
    except yaml.YAMLError as err:
        return [f"{where}: not valid YAML: {err}"]
    if not isinstance(env, dict):
        return [f"{where}: must be a YAML mapping, got {type(env).__name__}"]
    unknown = sorted(set(env) - RuntimeEnv.known_fields)
    if unknown:  # Ray would treat these as plugin names and fail at job start
        return [f"{where}: unknown runtime_env fields {unknown}"]
    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as err:
        return [f"{where}: {err}"]
    return []


def serve_config_problems(text: str | None, where: str) -> list[str]:
    """Check a serveConfigV2 with Ray Serve's schema; keys Serve would silently ignore are errors."""
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    if not text:
        return [f"{where}: empty; the RayService has nothing to deploy"]
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        return [f"{where}: not valid YAML: {err}"]
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as err:
        return [f"{where}: {_pydantic(err)}"]
    problems = _unknown_keys(config, ServeDeploySchema, where)
    for i, app in enumerate(config.get("applications", [])):
        at = f"{where}: applications[{i}]"
        problems += _unknown_keys(app, ServeApplicationSchema, at)
        if not re.fullmatch(r"[\w.]+:[\w.]+", app.get("import_path", "")):
            problems.append(f"{at}.import_path: {app.get('import_path')!r} is not 'module:attribute'")
        for j, dep in enumerate(app.get("deployments", [])):
            dat = f"{at}.deployments[{j}] ({dep.get('name')})"
            problems += _unknown_keys(dep, DeploymentSchema, dat)
            scaling = dep.get("autoscaling_config")
            if scaling is None and "num_replicas" not in dep:
                problems.append(f"{dat}: set autoscaling_config (or num_replicas)")
            if isinstance(scaling, dict):
                problems += _unknown_keys(scaling, AutoscalingConfig, f"{dat}.autoscaling_config")
                try:
                    AutoscalingConfig.model_validate(scaling)
                except ValidationError as err:
                    problems.append(f"{dat}.autoscaling_config: {_pydantic(err)}")
    return problems


def _unknown_keys(mapping: dict[str, Any], model: Any, where: str) -> list[str]:
    known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
    unknown = sorted(set(mapping) - known)
    return [f"{where}: unknown keys {unknown}; Serve would ignore them"] if unknown else []


def _pydantic(err: Any) -> str:
    return "; ".join(f"{json_path(e['loc'])}: {e['msg']}" if e["loc"] else e["msg"] for e in err.errors())


def iter_manifests(directory: Path = HERE / "k8s") -> Iterator[tuple[str, Any]]:
    """``(where, document)`` for every YAML document under ``directory``."""
    for path in sorted(directory.glob("*.yaml")):
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as err:
            raise ClusterConfigError(f"{path.name}: not valid YAML: {err}") from None
        for i, doc in enumerate(d for d in docs if d is not None):
            yield (f"{path.name}" if len(docs) == 1 else f"{path.name}#{i}"), doc


def validate_manifests(directory: Path = HERE / "k8s", pins: Pins | None = None) -> int:
    """Check every manifest under ``directory``; return how many documents were checked."""
    pins = pins or project_pins()
    problems, count = [], 0
    for where, doc in iter_manifests(directory):
        problems += manifest_problems(doc, where, pins)
        count += 1
    if count == 0:
        problems.append(f"{directory}: no manifests found")
    raise_problems(problems)
    return count
