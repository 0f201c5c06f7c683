"""KubeRay manifests: check-jsonschema against the vendored schemas, then what a schema cannot state.

``check-jsonschema --schemafile cluster/crds/manifests.schema.yaml cluster/k8s/*.yaml`` checks every field
of every document (one per file) against the KubeRay ``ray.io/v1`` types and the Kubernetes core types they
embed, unknown fields included. Then, for the documents that pass: versions and images agree with the pins,
GPUs only on ``-cuda`` images, unique group names and replica bounds, KubeRay's cluster choice for a RayJob,
entrypoints that are commands of our CLI, and Ray's own readers of what the manifest embeds (the
autoscaler's view of the cluster spec, ``RuntimeEnv``, Ray Serve's schema for ``serveConfigV2``).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from itertools import pairwise
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.runtime_env import RuntimeEnv
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

from cluster.pins import (
    GPU_RESOURCE,
    HERE,
    ClusterConfigError,
    Pins,
    cli_commands,
    image_problems,
    json_path,
    pinned,
    project_pins,
    raise_problems,
    tool,
)

CRDS = HERE / "crds"
K8S_DEFS = CRDS / "k8s-v1.33.0-defs.json"
MANIFEST_SCHEMA = CRDS / "manifests.schema.yaml"


def schema_problems(paths: list[Path]) -> dict[Path, list[str]]:
    """check-jsonschema's errors for each of ``paths`` (files that pass map to an empty list)."""
    cmd = [tool("check-jsonschema", "check-jsonschema"), "-o", "json", "--schemafile", str(MANIFEST_SCHEMA)]
    proc = subprocess.run([*cmd, *map(str, paths)], capture_output=True, text=True, timeout=300)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise ClusterConfigError(f"check-jsonschema failed (exit {proc.returncode}): {proc.stderr.strip()}") from None
    found: dict[Path, list[str]] = {p: [] for p in paths}
    for err in report.get("errors", []):
        line = f"{Path(err['filename']).name}: {err['path'].removeprefix('$.')}: {err['message']}"
        found.setdefault(Path(err["filename"]), []).append(line)
    for err in report.get("parse_errors", []):  # say why: check-jsonschema's JSON report does not
        path = Path(err["filename"])
        try:
            yaml.safe_load(path.read_text())
            reason = err["message"]
        except yaml.YAMLError as yaml_err:
            reason = str(yaml_err).replace("\n", " ")
        found.setdefault(path, []).append(f"{path.name}: not one valid YAML document: {reason}")
    return {p: list(dict.fromkeys(lines)) for p, lines in found.items()}


def manifest_problems(doc: dict[str, Any], where: str, pins: Pins) -> list[str]:
    """The rules beyond the schema for one document that passed it (empty when it is fine)."""
    if doc["apiVersion"] != "ray.io/v1":
        return []
    where = f"{where}: {doc['kind']}/{doc['metadata']['name']}: spec"
    spec, name = doc["spec"], doc["metadata"]["name"]
    if doc["kind"] == "RayCluster":
        return cluster_spec_problems(spec, where, name, pins)
    if doc["kind"] == "RayJob":
        return rayjob_problems(spec, where, name, pins)
    problems = cluster_spec_problems(spec["rayClusterConfig"], f"{where}.rayClusterConfig", "serve", pins)
    return problems + serve_config_problems(spec.get("serveConfigV2"), f"{where}.serveConfigV2")


def cluster_spec_problems(spec: dict[str, Any], where: str, name: str, pins: Pins) -> list[str]:
    """Pins, images, group names and replica bounds of a RayClusterSpec, then the Ray autoscaler's reading."""
    problems = []
    if spec.get("rayVersion") != pins.ray:
        got = spec.get("rayVersion")
        problems.append(f"{where}.rayVersion: {got!r} must equal ray in requirements.lock ({pins.ray})")
    groups = [("headGroupSpec", spec["headGroupSpec"])]
    groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(spec.get("workerGroupSpecs", []))]
    names = [g["groupName"] for _, g in groups[1:]]
    problems += [f"{where}.workerGroupSpecs: groupName {n!r} is used more than once" for n in sorted(set(names))
                 if names.count(n) > 1]  # fmt: skip
    for path, group in groups:
        at = f"{where}.{path}.template.spec.containers"
        containers = group["template"].get("spec", {}).get("containers", [])
        if not containers:
            problems.append(f"{at}: empty; the first container runs Ray")
            continue
        ray = containers[0]  # KubeRay runs Ray in the first container; the others are sidecars
        problems += image_problems(ray.get("image"), f"{at}[0]", pins)
        problems += [f"{at}[{i}]: image {c.get('image')!r} must be pinned by a tag other than latest"
                     for i, c in enumerate(containers[1:], 1) if not pinned(str(c.get("image", "")))]  # fmt: skip
        if ray.get("resources", {}).get("limits", {}).get(GPU_RESOURCE) and not str(ray.get("image")).endswith("-cuda"):
            problems.append(f"{at}[0]: requests {GPU_RESOURCE} but runs {ray.get('image')!r}, not a -cuda image")
        low, high, replicas = group.get("minReplicas", 0), group.get("maxReplicas", 0), group.get("replicas")
        if path != "headGroupSpec" and not 0 <= low <= high:
            problems.append(f"{where}.{path}: need 0 <= minReplicas ({low}) <= maxReplicas ({high})")
        elif path != "headGroupSpec" and replicas is not None and not low <= replicas <= high:
            problems.append(f"{where}.{path}.replicas: {replicas} is outside [minReplicas, maxReplicas]")
    if problems:
        return problems
    try:  # what the in-tree autoscaler makes of this spec (resources from rayStartParams and limits)
        _derive_autoscaling_config_from_ray_cr({"metadata": {"name": name, "namespace": "default"}, "spec": spec})
    except Exception as err:  # Ray raises ValueError, KeyError, AssertionError or jsonschema errors here
        return [f"{where}: the Ray autoscaler cannot read this spec: {type(err).__name__}: {err}"]
    return []


def rayjob_problems(spec: dict[str, Any], where: str, name: str, pins: Pins) -> list[str]:
    """KubeRay's cluster choice, an entrypoint our CLI runs on the cluster, a runtime env Ray accepts."""
    problems = []
    own, selector = "rayClusterSpec" in spec, "clusterSelector" in spec
    if own == selector:
        problems.append(f"{where}: set exactly one of rayClusterSpec (own cluster) or clusterSelector (existing)")
    if selector and "ray.io/cluster" not in spec["clusterSelector"]:
        problems.append(f"{where}.clusterSelector: must name the RayCluster as ray.io/cluster: <name>")
    if selector and spec.get("shutdownAfterJobFinishes"):
        problems.append(f"{where}.shutdownAfterJobFinishes: true would shut down a cluster this job does not own")
    if spec.get("submissionMode", "K8sJobMode") != "InteractiveMode":
        problems += entrypoint_problems(spec.get("entrypoint", ""), f"{where}.entrypoint", pins)
    problems += runtime_env_problems(spec.get("runtimeEnvYAML"), f"{where}.runtimeEnvYAML")
    if own:
        problems += cluster_spec_problems(spec["rayClusterSpec"], f"{where}.rayClusterSpec", name, pins)
    return problems


def entrypoint_problems(entrypoint: str, where: str, pins: Pins) -> list[str]:
    """``pluristeer <command> ... --address auto`` (or ``python -m <cli module> ...``): a command of the
    console script's Typer app that takes ``--address``, only options it has, joining the job's cluster."""
    script, module = pins.script[0], pins.script[1].partition(":")[0]
    words = shlex.split(entrypoint)
    if words[:1] == [script]:
        words = words[1:]
    elif re.fullmatch(r"python[\d.]*", words[0] if words else "") and words[1:3] == ["-m", module]:
        words = words[3:]
    else:
        return [f"{where}: {entrypoint!r} must run our CLI: '{script} <command> ... --address auto'"]
    commands = {c: opts for c, opts in cli_commands(pins).items() if "--address" in opts}
    if not words or words[0] not in commands:
        return [f"{where}: {entrypoint!r}: the command must be one of {sorted(commands)}"]
    options = [w.split("=", 1)[0] for w in words[1:] if w.startswith("-")]
    problems = [f"{where}: '{script} {words[0]}' has no option {o}" for o in options if o not in commands[words[0]]]
    if "--address=auto" not in words and ("--address", "auto") not in pairwise(words):
        problems.append(f"{where}: {entrypoint!r} must join the job's cluster: add --address auto")
    return problems


def runtime_env_problems(text: str | None, where: str) -> list[str]:
    """``runtimeEnvYAML`` as Ray reads it; unknown fields are errors (Ray would take them for plugins)."""
    if text is None:
        return []
    try:
        env = yaml.safe_load(text)
    except yaml.YAMLError as err:
        return [f"{where}: not valid YAML: {err}"]
    if not isinstance(env, dict):
        return [f"{where}: must be a YAML mapping, got {type(env).__name__}"]
    unknown = sorted(set(env) - RuntimeEnv.known_fields)
    if unknown:
        return [f"{where}: unknown runtime_env fields {unknown}"]
    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as err:
        return [f"{where}: {err}"]
    return []


def serve_config_problems(text: str | None, where: str) -> list[str]:
    """A serveConfigV2 through Ray Serve's schema; keys Serve would silently ignore are errors."""
    if not text:
        return [f"{where}: empty; the RayService has nothing to deploy"]
    try:
        config = yaml.safe_load(text)
        ServeDeploySchema.model_validate(config)
    except yaml.YAMLError as err:
        return [f"{where}: not valid YAML: {err}"]
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


def _pydantic(err: ValidationError) -> str:
    return "; ".join(f"{json_path(e['loc'])}: {e['msg']}" if e["loc"] else e["msg"] for e in err.errors())


def validate_manifests(directory: Path = HERE / "k8s", pins: Pins | None = None) -> int:
    """Check every ``*.yaml`` under ``directory``; returns how many were checked."""
    pins = pins or project_pins()
    paths = sorted(directory.glob("*.yaml"))
    if not paths:
        raise_problems([f"{directory}: no manifests found"])
    problems = []
    for path, found in schema_problems(paths).items():
        problems += found or manifest_problems(yaml.safe_load(path.read_text()), path.name, pins)
    raise_problems(problems)
    return len(paths)
