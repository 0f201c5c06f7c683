"""``ServeConfig``: what `pluristeer serve` deploys (DESIGN §4), loadable from YAML and ``--set`` overrides.

Deployment options (replicas, autoscaling, actor resources) start from the defaults below and are
overridden per deployment by ``deployments``: a mapping from a deployment name — ``PluralAggregator``,
``BaseModel``, ``FusedPlural``, ``PerspectivePool``, ``PerspectiveModel`` (every perspective) or
``PerspectiveModel-<slug>`` (one perspective) — to Serve deployment options, e.g.::

    deployments:
      PerspectiveModel-united_states:
        autoscaling_config: {min_replicas: 1, max_replicas: 8, target_ongoing_requests: 8}
        ray_actor_options: {num_cpus: 1, num_gpus: 0.25}

A Serve config file (``serve/serve_config.yaml``) can override them again by deployment name.

Perspectives are served two ways, side by side: a few heavy ones by their own ``PerspectiveModel-<slug>``
deployment (``perspectives``), and any number by the shared ``PerspectivePool`` (``pool``), whose every
replica holds the model, the SAE and the whole VectorSet (a few KB per perspective) and serves any of them::

    perspectives: [United States]        # its own deployment, scaled on its own
    pool: ["*"]                          # every other perspective of the set, on the pool's replicas
    deployments:
      PerspectivePool: {num_replicas: 3}
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError
from ray.serve.config import AutoscalingConfig

from common.config import (
    ComputeDtype,
    ConfigError,
    Count,
    NonNegFloat,
    NonNegInt,
    PathOrURI,
    Positive,
    RaySection,
    StageConfig,
    TorchDevice,
    check,
)

AGGREGATOR = "PluralAggregator"
BASE = "BaseModel"
FUSED = "FusedPlural"
PERSPECTIVE = "PerspectiveModel"
POOL = "PerspectivePool"
ALL = "*"  # `pool: ["*"]`: every perspective of the set without its own deployment
DEFAULT_API_KEYS_ENV = "PLURISTEER_API_KEYS"
DEPLOYMENT_KEYS = (
    "num_replicas",
    "autoscaling_config",
    "max_ongoing_requests",
    "max_queued_requests",
    "ray_actor_options",
    "health_check_period_s",
    "health_check_timeout_s",
    "graceful_shutdown_timeout_s",
    "graceful_shutdown_wait_loop_s",
)


def slug(perspective: str) -> str:
    """A perspective's part of its deployment name: ``"United States"`` -> ``"united_states"``."""
    out = re.sub(r"[^a-z0-9]+", "_", perspective.lower()).strip("_")
    return out or "p"


def perspective_deployment(perspective: str) -> str:
    return f"{PERSPECTIVE}-{slug(perspective)}"


@dataclass
class ReplicaConfig(StageConfig, RaySection):
    """What a model replica (``BaseModel``, ``PerspectiveModel``, ``PerspectivePool``, ``FusedPlural``) is
    given: the model, the vectors, the steering and the batching. :class:`ServeConfig` adds the topology,
    the default decoding and the API, which only the aggregator and ``pluristeer serve`` read."""

    vectors: str = ""  # registry key of the VectorSet: name, name@latest (follows new versions) or name@N
    model: str = "embedded"
    sae: PathOrURI | None = None  # default: the SAE path the vector set records
    dtype: ComputeDtype = "float32"
    device: TorchDevice = "auto"
    registry_dir: PathOrURI | None = None
    vector_poll_s: Positive = 2.0  # how often replicas look for a new version of the set
    # steering
    coeff: float = 1.0
    steer_mode: Literal["sae", "residual", "caa"] | None = None  # default: the set's own mode
    keep_error: bool = True
    steer_decode: bool = True
    from_position: NonNegInt = 0
    # batching and sessions
    max_batch_rows: Count = 32  # rows in one forward (continuous batching)
    max_batch_tokens: Count = 8192  # padded tokens in one replay forward
    # longest wait for the last batch's sessions to be back (serve/batcher.py)
    batch_gather_s: Annotated[float, Field(ge=0, le=1, description="seconds; 0: no wait")] = 0.1
    max_sessions: NonNegInt = 64  # sessions whose KV caches a replica keeps (LRU; all of a session's rows count once)
    session_ttl_s: Positive = 300.0
    # on CPU (float32), time a few-row step both ways at startup and keep the faster matmul (sae/small_batch.py)
    tune_matmul: bool = True

    def validate(self) -> None:
        check(bool(self.vectors.strip()), "vectors: a registry name is required")


REPLICA_FIELDS = tuple(f.name for f in dataclasses.fields(ReplicaConfig))


@dataclass
class ServeConfig(ReplicaConfig):
    """Settings of ``pluristeer serve`` (YAML + ``--set field=value``): the replicas' (:class:`ReplicaConfig`)
    and these."""

    # what is served
    vectors_file: PathOrURI | None = None  # publish this VectorSet file as `vectors` first (if it is not the latest)
    perspectives: list[str] = field(default_factory=list)  # own deployments (default: all of the set, none with pool)
    pool: list[str] = field(default_factory=list)  # served by PerspectivePool instead; ["*"]: all the rest of the set
    # default decoding (a request's `decoding` overrides it)
    decoding_mode: Literal["mean", "cad", "dvd"] = "dvd"
    alpha: NonNegFloat = 0.2
    tau: Positive = 0.4
    top_k: Count = 20
    # topology
    backend: Literal["replicas", "fused", "both"] = "replicas"  # both: a request's `backend` picks (default replicas)
    app_name: str = "pluristeer"
    route_prefix: str = "/"
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    replica_cpus: NonNegFloat = 0.5
    replica_gpus: NonNegFloat = 0.0
    aggregator_cpus: NonNegFloat = 0.25
    min_replicas: NonNegInt = 1
    max_replicas: Count = 2
    target_ongoing_requests: Positive = 16.0
    max_ongoing_requests: Count = 64
    deployments: dict[str, Any] = field(default_factory=dict)  # per-deployment Serve options (module docstring)
    torch_threads: Annotated[int, Field(ge=0, description="0: from num_cpus")] = 0  # per model replica
    session_affinity: bool = True  # route a session's steps to the replica holding its cache
    # a request one deployment answers alone (unsteered, one perspective, pooled, fused) decodes on its replica
    decode_on_replica: bool = True  # false: every step is a round trip from the aggregator (serve/fanout.py)
    # the API
    auth: bool = True  # bearer keys on everything but /healthz
    api_keys_env: str = DEFAULT_API_KEYS_ENV  # comma-separated keys in this environment variable
    add_special_tokens: bool = False  # completions: prompts are complete model inputs
    max_prompt_tokens: Count = 4096
    max_tokens_limit: Count = 512  # upper bound of a request's max_tokens
    default_max_tokens: Count = 16  # OpenAI's default for completions
    max_perspectives: Count = 8  # K
    max_prompts: Count = 8  # prompts in one /v1/completions request
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1_000_000
    request_timeout_s: Positive = 300.0
    step_timeout_s: Positive = 60.0  # one call to one deployment; a lost replica is retried until the request times out

    def validate(self) -> None:
        check(bool(self.vectors.strip()) or self.vectors_file is not None, "vectors: a registry name is required")
        check(len(set(self.perspectives)) == len(self.perspectives), "perspectives: listed twice")
        slugs = [slug(p) for p in self.perspectives]
        check(len(set(slugs)) == len(slugs), f"perspectives: two of them share a deployment name ({slugs})")
        check(len(set(self.pool)) == len(self.pool), "pool: listed twice")
        check(ALL not in self.pool or self.pool == [ALL], f"pool: {ALL!r} stands alone (every other perspective)")
        both = sorted(set(self.pool) & set(self.perspectives))
        check(not both, f"pool: {both} also have their own deployment (perspectives); list each in one of them")
        check(not self.pool or self.backend != "fused", "pool: needs backend replicas or both (fused serves all)")
        check(self.route_prefix.startswith("/"), "route_prefix: must start with '/'")
        check(self.min_replicas <= self.max_replicas, "min_replicas, max_replicas: need 0 <= min <= max")
        check(bool(self.api_keys_env.strip()), "api_keys_env: name an environment variable")
        check(self.default_max_tokens <= self.max_tokens_limit, "default_max_tokens: 1..max_tokens_limit")
        for name, options in self.deployments.items():
            check(
                name in (AGGREGATOR, BASE, FUSED, POOL, PERSPECTIVE) or name.startswith(f"{PERSPECTIVE}-"),
                f"deployments: unknown deployment {name!r}; use {AGGREGATOR}, {BASE}, {FUSED}, {POOL}, "
                f"{PERSPECTIVE} or {PERSPECTIVE}-<perspective slug>",
            )
            check(isinstance(options, dict), f"deployments.{name}: expected a mapping of Serve options")
            unknown = sorted(set(options) - set(DEPLOYMENT_KEYS))
            check(not unknown, f"deployments.{name}: unknown option(s) {unknown}; allowed: {list(DEPLOYMENT_KEYS)}")
            if "autoscaling_config" in options:
                _check_autoscaling(options["autoscaling_config"], f"deployments.{name}.autoscaling_config")

    # -- deployment options ------------------------------------------------------------------------------
    def defaults(self, kind: str) -> dict[str, Any]:
        if kind == AGGREGATOR:
            return {
                "max_ongoing_requests": 4 * self.max_ongoing_requests,
                "autoscaling_config": {
                    "min_replicas": max(1, self.min_replicas),
                    "max_replicas": self.max_replicas,
                    "target_ongoing_requests": 2 * self.target_ongoing_requests,
                },
                "ray_actor_options": {"num_cpus": self.aggregator_cpus},
            }
        actor: dict[str, Any] = {"num_cpus": self.replica_cpus}
        if self.replica_gpus > 0:
            actor["num_gpus"] = self.replica_gpus
        return {
            "max_ongoing_requests": self.max_ongoing_requests,
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            },
            "ray_actor_options": actor,
        }

    def deployment_options(self, name: str) -> dict[str, Any]:
        """Serve options of deployment ``name``: defaults, then ``deployments[kind]``, then ``deployments[name]``."""
        kind = PERSPECTIVE if name.startswith(f"{PERSPECTIVE}-") else name
        options = self.defaults(kind)
        for key in dict.fromkeys((kind, name)):
            for option, value in copy.deepcopy(self.deployments.get(key, {})).items():
                if option in ("autoscaling_config", "ray_actor_options") and isinstance(value, dict):
                    options[option] = {**options.get(option, {}), **value}
                else:
                    options[option] = value
        if "num_replicas" in options:  # a fixed replica count replaces autoscaling
            options.pop("autoscaling_config", None)
        return options

    def scales_to_zero(self, name: str) -> bool:
        """Whether deployment ``name`` autoscales with ``min_replicas: 0`` (a call to it may start a replica)."""
        autoscaling = self.deployment_options(name).get("autoscaling_config")
        return autoscaling is not None and autoscaling.get("min_replicas", 1) == 0

    def threads_for(self, options: dict[str, Any]) -> int:
        if self.torch_threads:
            return self.torch_threads
        return max(1, int(options.get("ray_actor_options", {}).get("num_cpus", 1) or 1))


def _check_autoscaling(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping")
    try:
        AutoscalingConfig(**value)
    except (ValidationError, ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {str(err).splitlines()[0] if str(err) else err}") from None


__all__ = [
    "AGGREGATOR",
    "ALL",
    "BASE",
    "DEFAULT_API_KEYS_ENV",
    "FUSED",
    "PERSPECTIVE",
    "POOL",
    "REPLICA_FIELDS",
    "ReplicaConfig",
    "ServeConfig",
    "perspective_deployment",
    "slug",
]
