from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.registry import REGISTRY_NAME, RegistryClient, RegistryError, VectorRegistry, parse_key
from pipelines.vectors import VectorConfig, config_pairs, derive_fine
from sae.vectorset import VectorSet, VectorSetMeta
from tests.conftest import REPO


def _set(value: float = 1.0) -> VectorSet:
    meta = VectorSetMeta(
        model="m", layer=3, mode="caa", granularity="fine", task="t", n_samples={"p": 5, "q": 4}, readout="last", dim=8
    )
    return VectorSet({"p": torch.full((8,), value), "q": torch.arange(8.0)}, meta)


def test_keys_and_versions_without_ray(tmp_path: Path) -> None:
    assert parse_key("crehate-sae-fine@3") == ("crehate-sae-fine", 3)
    assert parse_key("x@latest") == ("x", None) and parse_key("x") == ("x", None)
    for bad in ("../x", "x@0", "x@v2", ""):
        with pytest.raises(RegistryError):
            parse_key(bad)
    reg = VectorRegistry(str(tmp_path))
    assert reg.publish("opinions", _set(1.0).to_bytes())["key"] == "opinions@1"
    assert reg.publish("opinions", _set(2.0).to_bytes())["key"] == "opinions@2"
    assert reg.latest("opinions") == 2 and reg.latest("nothing") is None
    first = VectorSet.from_bytes(reg.get("opinions@1")["ref"])
    assert first["p"][0].item() == 1.0
    assert [e["key"] for e in reg.list()] == ["opinions@1", "opinions@2"]
    with pytest.raises(RegistryError, match="has no version 7"):
        reg.get("opinions@7")
    with pytest.raises(RegistryError, match="no vector set named 'other'"):
        reg.get("other")
    with pytest.raises(Exception, match="not a readable safetensors"):
        reg.publish("broken", b"\x00" * 20)
    reborn = VectorRegistry(str(tmp_path))  # a restarted actor rebuilds its table from index.json
    assert reborn.latest("opinions") == 2 and reborn.loaded() == 0
    assert VectorSet.from_bytes(reborn.get("opinions")["ref"])["p"][0].item() == 2.0
    assert (tmp_path / "opinions" / "v2.safetensors").is_file()


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """``(address, registry root)`` of a local Ray cluster that lives for this module."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="pluristeer-tests")
    try:
        yield ray.get_runtime_context().gcs_address, tmp_path_factory.mktemp("registry")
    finally:
        ray.shutdown()


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "200"}


FETCH = """
import json, sys
from common.registry import RegistryClient
client = RegistryClient(address=sys.argv[1])
vs = client.get(sys.argv[2])
print(json.dumps({"latest": client.latest(sys.argv[2]), "perspectives": vs.perspectives,
                  "granularity": vs.meta.granularity, "sums": {p: float(v.sum()) for p, v in vs.vectors.items()}}))
"""


def test_durable_copy_on_s3_survives_a_new_registry(s3_bucket: str) -> None:
    from sae import storage

    root = f"{s3_bucket}/registry"
    reg = VectorRegistry(root)
    assert reg.publish("opinions", _set(1.0).to_bytes())["key"] == "opinions@1"
    assert reg.publish("opinions", _set(2.0).to_bytes())["path"] == f"{root}/opinions/v2.safetensors"
    assert storage.listdir(root) == ["index.json"] and storage.listdir(f"{root}/opinions") == [
        "v1.safetensors",
        "v2.safetensors",
    ]
    again = VectorRegistry(root)  # a restarted actor: the table and the bytes come back from S3
    assert again.latest("opinions") == 2 and again.loaded() == 0
    assert VectorSet.from_bytes(again.get("opinions@1")["ref"])["p"][0].item() == 1.0
    storage.delete(f"{root}/opinions/v1.safetensors")
    with pytest.raises(RegistryError, match=f"opinions@1: its durable file {root}/opinions/v1.safetensors is gone"):
        VectorRegistry(root).get("opinions@1")


def test_a_set_published_by_one_driver_is_fetched_by_another_after_it_exits(
    ray_cluster, tmp_path: Path, embedded, embedded_sae, data_root
) -> None:
    """Driver 1 is `pluristeer vectors` (Ray-parallel derivation in 2 tasks, then publish); driver 2 fetches."""
    address, registry = ray_cluster
    out = tmp_path / "out"
    overrides = [
        f"sae={embedded_sae.path}", "task=mislc", "samples=3", "max_perspectives=2", "workers=2", "worker_cpus=0.5",
        f"out={out}", f"registry_dir={registry}", f"ray_address={address}", "track=false",
    ]  # fmt: skip
    cli = [sys.executable, "-m", "pluristeer.cli", "vectors", *(a for o in overrides for a in ("--set", o))]
    first = subprocess.run(cli, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "published mislc-sae-fine@1" in first.stdout and "2 Ray tasks" in first.stdout
    written = VectorSet.load(out / "mislc-sae-fine.safetensors")

    # The Ray-parallel vectors equal an in-process derivation of the same pairs.
    model, tok = embedded
    cfg = VectorConfig.load(None, overrides)
    pairs = config_pairs(cfg, tok)
    local = derive_fine(cfg, model, tok, embedded_sae.sae, 15, pairs)
    for p, v in local.fine.items():  # equal up to float noise (batches differ; a TopK tie may flip a feature)
        assert torch.cosine_similarity(written[p], v, dim=0) > 0.99

    second = subprocess.run(
        [sys.executable, "-c", FETCH, address, "mislc-sae-fine"],
        capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    got = json.loads(second.stdout.strip().splitlines()[-1])
    assert got["latest"] == 1 and got["perspectives"] == written.perspectives and got["granularity"] == "fine"
    for p, total in got["sums"].items():
        assert total == pytest.approx(float(written[p].sum()), abs=1e-5)


@pytest.mark.fault
def test_registry_recovers_from_a_lost_actor_and_watchers_see_new_versions(ray_cluster, tmp_path: Path) -> None:
    import ray

    address, registry = ray_cluster
    client = RegistryClient(registry, address=address)
    key = client.publish(_set(3.0), "watched")
    watch = client.watch("watched", interval_s=0.0)
    assert watch.current()["p"][0].item() == 3.0 and watch.version == int(key.split("@")[1])

    ray.kill(ray.get_actor(REGISTRY_NAME, namespace="pluristeer"), no_restart=True)
    again = client.get(key)  # the dead actor is recreated from the durable index on the next call
    assert again["p"][0].item() == 3.0
    assert client.latest("watched") == watch.version

    new_key = client.publish(_set(4.0), "watched")
    assert watch.current()["p"][0].item() == 4.0 and watch.version == int(new_key.split("@")[1])
    with pytest.raises(RegistryError, match="no vector set named 'missing'"):
        client.get("missing")
    with pytest.raises(RegistryError, match="already runs with root"):
        RegistryClient(tmp_path / "elsewhere", address=address)
