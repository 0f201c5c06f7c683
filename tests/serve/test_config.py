"""ServeConfig, the Serve config file and the RayService manifest agree with the app that build_app makes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from cluster.manifests import serve_config_problems
from common.config import ConfigError
from serve.app import build, config_from_args, cpus_needed, deployment_names
from serve.config import ALL, POOL, REPLICA_FIELDS, ReplicaConfig, ServeConfig, perspective_deployment, slug
from serve.replicas import PerspectivePool
from tests.conftest import REPO


def test_defaults_and_per_deployment_options() -> None:
    cfg = ServeConfig.from_dict(
        {
            "vectors": "opinions",
            "replica_cpus": 0.5,
            "deployments": {
                "PerspectiveModel": {"autoscaling_config": {"max_replicas": 6}},
                "PerspectiveModel-united_states": {"ray_actor_options": {"num_gpus": 0.25}},
                "BaseModel": {"num_replicas": 3},
            },
        }
    )
    us = cfg.deployment_options(perspective_deployment("United States"))
    assert us["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 6, "target_ongoing_requests": 16.0}
    assert us["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.25}
    assert cfg.deployment_options("PerspectiveModel-britain")["ray_actor_options"] == {"num_cpus": 0.5}
    base = cfg.deployment_options("BaseModel")
    assert base["num_replicas"] == 3 and "autoscaling_config" not in base
    assert cfg.deployment_options("PluralAggregator")["ray_actor_options"] == {"num_cpus": 0.25}
    assert (
        slug("S. Africa") == "s_africa" and perspective_deployment("United States") == "PerspectiveModel-united_states"
    )
    idle = {**cfg.deployments, "PerspectiveModel-britain": {"autoscaling_config": {"min_replicas": 0}}}
    scaled = ServeConfig.from_dict({"vectors": "opinions", "deployments": idle})
    assert scaled.scales_to_zero("PerspectiveModel-britain")  # a metrics scrape must not wake it
    assert not scaled.scales_to_zero(perspective_deployment("United States")) and not scaled.scales_to_zero("BaseModel")
    names = deployment_names(cfg, ["United States", "Britain"])
    assert names == ["PluralAggregator", "BaseModel", "PerspectiveModel-united_states", "PerspectiveModel-britain"]
    fused = ServeConfig.from_dict({"vectors": "x", "backend": "fused"})
    assert deployment_names(fused, ["a"]) == ["PluralAggregator", "FusedPlural"]
    assert cpus_needed(cfg, ["United States", "Britain"]) == pytest.approx(0.25 + 3 * 0.5 + 2 * 0.5)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "vectors: a registry name is required"),
        ({"vectors": "x", "deployments": {"Aggregator": {}}}, "unknown deployment 'Aggregator'"),
        ({"vectors": "x", "deployments": {"BaseModel": {"replicas": 2}}}, "unknown option(s) ['replicas']"),
        (
            {
                "vectors": "x",
                "deployments": {"BaseModel": {"autoscaling_config": {"min_replicas": 3, "max_replicas": 1}}},
            },
            "deployments.BaseModel.autoscaling_config",
        ),
        ({"vectors": "x", "perspectives": ["S. Africa", "S Africa"]}, "share a deployment name"),
        ({"vectors": "x", "min_replicas": 3, "max_replicas": 2}, "need 0 <= min <= max"),
        ({"vectors": "x", "backend": "mixed"}, "backend: must be one of"),
        ({"vectors": "x", "default_max_tokens": 600}, "default_max_tokens"),
        ({"vectors": "x", "perspectives": ["A"], "pool": ["A", "B"]}, "pool: ['A'] also have their own deployment"),
        ({"vectors": "x", "pool": ["*", "B"]}, "pool: '*' stands alone"),
        ({"vectors": "x", "pool": ["*"], "backend": "fused"}, "pool: needs backend replicas or both"),
        ({"vectors": "x", "batch_gather_s": 5}, "batch_gather_s"),
    ],
)
def test_bad_configs_name_the_field(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        ServeConfig.from_dict(data)
    assert message in str(err.value)


def test_a_pool_is_one_deployment_whatever_the_number_of_perspectives() -> None:
    cfg = ServeConfig.from_dict({"vectors": "x", "perspectives": ["a"], "pool": ["*"], "replica_cpus": 0.25,
                                 "deployments": {"PerspectivePool": {"num_replicas": 3}}})  # fmt: skip
    assert deployment_names(cfg, ["a"]) == ["PluralAggregator", "BaseModel", "PerspectiveModel-a", "PerspectivePool"]
    assert cpus_needed(cfg, ["a"]) == pytest.approx(0.25 + 0.25 + 0.25 + 3 * 0.25)
    assert cfg.deployment_options("PerspectivePool")["num_replicas"] == 3


def _app_and_names(serve_config: dict) -> tuple[dict, set[str]]:
    (app,) = serve_config["applications"]
    cfg = config_from_args(app["args"])
    return app, set(deployment_names(cfg, cfg.perspectives))


@pytest.mark.parametrize("where", ["serve/serve_config.yaml", "cluster/k8s/rayservice.yaml"])
def test_serve_configs_match_the_app(where: str, tmp_path: Path) -> None:
    doc = yaml.safe_load((REPO / where).read_text())
    text = doc["spec"]["serveConfigV2"] if where.endswith("rayservice.yaml") else (REPO / where).read_text()
    assert serve_config_problems(text, where) == []
    app, names = _app_and_names(yaml.safe_load(text))
    assert app["import_path"] == "serve.app:build_app"
    assert {d["name"] for d in app["deployments"]} == names  # every deployment is configured, none is unknown
    cfg = config_from_args(app["args"])
    assert cfg.vectors == "globalopinionqa-sae-fine" and cfg.perspectives == ["United States", "Britain"]
    assert cfg.pool == [ALL] and POOL in names  # the heavy perspectives on their own, the rest of the set pooled
    # the file's deployment entries are valid ServeConfig `deployments` too: the pool's options parse, merge over
    # the defaults, autoscale from at least one replica, and Serve itself accepts them
    entries = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app["deployments"]}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({**app["args"], "deployments": entries}))
    options = ServeConfig.load(path).deployment_options(POOL)
    scaling = options["autoscaling_config"]
    assert scaling == entries[POOL]["autoscaling_config"] and "num_replicas" not in options
    assert 1 <= scaling["min_replicas"] < scaling["max_replicas"]
    assert options["ray_actor_options"] == entries[POOL]["ray_actor_options"]
    deployment = PerspectivePool.options(name=POOL, **options)
    assert deployment.max_ongoing_requests == entries[POOL]["max_ongoing_requests"]


def test_app_args_take_a_config_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("vectors: opinions\nmax_tokens_limit: 64\nperspectives: [A, B]\n")
    cfg = config_from_args({"config": str(path), "max_tokens_limit": "32", "backend": "fused", "vectors": "1984"})
    assert (cfg.max_tokens_limit, cfg.backend, cfg.perspectives, cfg.vectors) == (32, "fused", ["A", "B"], "1984")
    with pytest.raises(ConfigError, match="does not exist"):
        config_from_args({"config": str(tmp_path / "missing.yaml")})


def test_model_replicas_are_given_their_part_of_the_config_only(tmp_path: Path) -> None:
    """The aggregator gets the whole ServeConfig; BaseModel, PerspectiveModel-* and PerspectivePool only the
    ReplicaConfig fields (model, vectors, steering, batching): no API limits, keys or topology."""
    cfg = ServeConfig.from_dict({"vectors": "x", "registry_dir": str(tmp_path), "perspectives": ["a"], "pool": ["b"]})
    aggregator = build(cfg, ["a"], ["b"])._bound_deployment
    spec, _, replicas, base, _, pool, _ = aggregator.init_args
    assert set(spec) == {f.name for f in dataclasses.fields(ServeConfig)}
    bound = [base, pool, *replicas.values()]
    assert [b._bound_deployment.name for b in bound] == ["BaseModel", "PerspectivePool", "PerspectiveModel-a"]
    for b in bound:
        given = b._bound_deployment.init_args[0]
        assert set(given) == set(REPLICA_FIELDS) and "max_tokens_limit" not in given
        assert ReplicaConfig.from_dict(given).vectors == "x"
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['max_tokens_limit'\]"):
        ReplicaConfig.from_dict({"vectors": "x", "max_tokens_limit": 3})
