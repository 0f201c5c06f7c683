"""collect -> train -> serve on one local 3-node Ray cluster (``ray.cluster_utils.Cluster``: a head and two worker
nodes marked by custom resources ``node_a`` / ``node_b`` and a shared ``slot``), each stage spread over the two
worker nodes and checked against the same stage confined to one node. Tiny random Llama (``tiny_lm_dir``).

The spread runs keep every artifact on a real S3 server (moto, tests/s3_server.py) — the store, Ray Train's
checkpoints, the SAE directory and the registry's durable copy, so the nodes share no path — and the
single-node runs keep theirs on local disk: the equalities below also compare object storage with disk.

No shared disk: every node gets its own working directory (its raylet, and so every worker it starts, runs
there), its own ``TMPDIR``, ``PLURISTEER_CACHE`` and Ray temp dir, and the driver its own working directory
and temp dir, so a relative or temp path written on one node names nothing on another; the last test checks
that and that none of the spread runs' artifacts landed on any of those disks, only in the bucket."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pyarrow.fs as pafs
import pytest
import ray
import ray.data
import torch
from ray import serve
from ray._private import ray_constants
from ray.cluster_utils import Cluster

from common.config import ConfigError
from common.registry import RegistryClient
from pipelines.collect import CollectConfig, collect
from pipelines.store import ActivationStore
from pipelines.train import TrainConfig, TrainResult, run_train
from sae.decoding import Decoding, plural_generate
from sae.lm import load_lm, model_name
from sae.model import SparseAutoencoder
from sae.vectorset import VectorSet, VectorSetMeta, sae_file_hash, sae_fingerprint
from serve.app import build
from serve.config import ServeConfig

KEY = "multinode-test-key"
LAYER = 2


@dataclass
class Nodes:
    address: str
    head: str
    a: str
    b: str
    disks: dict[str, Path] = field(default_factory=dict)  # "driver", "head", "a", "b" -> that one's own disk
    raylets: dict[str, int] = field(default_factory=dict)  # "head", "a", "b" -> the pid of its raylet


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _disk(root: Path, name: str) -> Path:
    """``root/name`` with ``cwd``, ``tmp`` and ``cache``: one node's (or the driver's) own local disk."""
    for sub in ("cwd", "tmp", "cache"):
        (root / name / sub).mkdir(parents=True)
    return root / name


def _node_env(disk: Path) -> dict[str, str]:
    return {"TMPDIR": str(disk / "tmp"), "PLURISTEER_CACHE": str(disk / "cache")}


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.setenv("PLURISTEER_API_KEYS", KEY)  # before the nodes start: serve replicas inherit it
    for key, value in s3_server.env.items():  # and the S3 endpoint and credentials, as pods get them from a Secret
        patch.setenv(key, value)
    if ray.is_initialized():
        ray.shutdown()
    root = tmp_path_factory.mktemp("multinode-disks")
    disks = {name: _disk(root, name) for name in ("driver", "head", "a", "b")}
    # Ray's own temp dirs, one per node, short (a session's unix sockets live there: paths of <= 107 bytes)
    ray_tmp = {name: tempfile.mkdtemp(prefix=f"pluristeer-{name}-", dir="/tmp") for name in ("head", "a", "b")}
    own = {name: {"env_vars": _node_env(disks[name]), "temp_dir": ray_tmp[name]} for name in ray_tmp}
    t0 = time.perf_counter()
    # A node's raylet (and so every worker it starts) runs in the directory the driver is in when it adds the
    # node: each node its own. No dashboard: Ray Train's placement-group cleaner then finds no State API and
    # leaves the workers alone (with one, it may ask another Ray's dashboard on this shared machine, see the
    # controller alive nowhere and remove the run's placement group)
    patch.chdir(disks["head"] / "cwd")
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"head": 1}, "include_dashboard": False, **own["head"]},
    )
    patch.chdir(disks["a"] / "cwd")
    a = c.add_node(num_cpus=1, resources={"node_a": 1, "slot": 1}, **own["a"])
    patch.chdir(disks["b"] / "cwd")
    b = c.add_node(num_cpus=1, resources={"node_b": 1, "slot": 1}, **own["b"])
    patch.chdir(disks["driver"] / "cwd")  # the driver's own: a relative path it writes is nowhere else
    patch.setenv("TMPDIR", str(disks["driver"] / "tmp"))
    patch.setattr(tempfile, "tempdir", str(disks["driver"] / "tmp"))  # the driver's uploads stage their files here
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    print(f"3-node cluster up in {time.perf_counter() - t0:.1f} s")
    raylets = {
        name: node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        for name, node in (("head", c.head_node), ("a", a), ("b", b))
    }
    try:
        yield Nodes(c.address, c.head_node.node_id, a.node_id, b.node_id, disks, raylets)
    finally:
        serve.shutdown()
        ray.shutdown()
        c.shutdown()
        patch.undo()
        for path in ray_tmp.values():
            shutil.rmtree(path, ignore_errors=True)


def _collect_cfg(tiny_lm_dir: Path, data_root: Path, out: Path | str, address: str, **kw: Any) -> CollectConfig:
    base = {
        "model": str(tiny_lm_dir), "layers": [LAYER], "context_size": 32, "n_tokens": 1500, "batch_size": 2,
        "contexts_per_shard": 4, "out": out, "corpus": data_root / "corpus", "sources": ["ag_news"],
        "actor_cpus": 0.5, "torch_threads": 1, "ray_address": address, "track": False,
    }  # fmt: skip
    return CollectConfig.from_dict({**base, **kw})


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    return s3_server.create_bucket("multinode")


@pytest.fixture(scope="module")
def stores(cluster: Nodes, bucket: str, tiny_lm_dir: Path, data_root: Path, tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("multinode-stores")
    # Ray Data starts a pool's actors asynchronously: on a slow machine the first actor finished every shard
    # before the second had loaded its model (CI, stop 22). Waiting for the whole pool makes "both nodes
    # wrote shards" a property of the placement, not of the machine's speed.
    data_context = ray.data.DataContext.get_current()
    wait_before, data_context.wait_for_min_actors_s = data_context.wait_for_min_actors_s, 120
    try:
        spread = collect(
            _collect_cfg(tiny_lm_dir, data_root, f"{bucket}/stores/spread", cluster.address, num_actors=2,
                         actor_resources={"slot": 1}),  # one slot per worker node: one actor on each
            echo=lambda _: None,
        )  # fmt: skip
    finally:
        data_context.wait_for_min_actors_s = wait_before
    single = collect(
        _collect_cfg(tiny_lm_dir, data_root, root / "single", cluster.address, num_actors=1,
                     actor_resources={"node_a": 1}),
        echo=lambda _: None,
    )  # fmt: skip
    return {"spread": spread, "single": single}


def test_collection_actors_on_two_nodes_write_the_single_node_store(cluster: Nodes, bucket: str, stores) -> None:
    spread, single = stores["spread"], stores["single"]
    assert spread.out == f"{bucket}/stores/spread"  # on S3; the single-node store on local disk
    assert spread.nodes == {cluster.a, cluster.b} and single.nodes == {cluster.a}
    assert {t["node"] for t in spread.shard_times} == {cluster.a, cluster.b}
    x, y = ActivationStore(spread.out), ActivationStore(single.out)
    x.verify()
    y.verify()
    assert len(x) == len(y) == 1500 and [s.rows for s in x.manifest.shards] == [s.rows for s in y.manifest.shards]
    assert torch.equal(x.read(LAYER), y.read(LAYER))  # bit for bit
    for column in ("token_id", "context", "position"):
        np.testing.assert_array_equal(x.read_column(column), y.read_column(column))
    sx, sy = x.manifest.stats[str(LAYER)], y.manifest.stats[str(LAYER)]  # merged in completion order
    np.testing.assert_allclose(sx["mean"], sy["mean"], rtol=1e-5, atol=1e-6)


def _train_cfg(store: Path | str, out: Path | str, address: str, **kw: Any) -> TrainConfig:
    base = {
        "store": str(store), "expansions": [2], "k": 4, "lr": 3e-3, "batch_size": 256, "epochs": 1, "workers": 2,
        "cpus_per_worker": 0.5, "out": str(out), "eval_tokens": 0, "track": False, "dead_tokens": 1024,
        "ray_address": address, "seed": 3,
    }  # fmt: skip
    return TrainConfig.from_dict({**base, **kw})


@pytest.fixture(scope="module")
def trained(cluster: Nodes, bucket: str, stores, tmp_path_factory) -> dict[str, TrainResult]:
    root = tmp_path_factory.mktemp("multinode-train")
    spread = run_train(
        _train_cfg(stores["spread"].out, f"{bucket}/train/spread", cluster.address, worker_resources={"slot": 1},
                   placement_strategy="STRICT_SPREAD")
    )  # fmt: skip
    single = run_train(_train_cfg(stores["single"].out, root / "single", cluster.address,
                                  worker_resources={"node_a": 0.5}))  # fmt: skip
    return {"spread": spread, "single": single}


def test_two_training_workers_on_two_nodes_train_the_single_node_sae(cluster: Nodes, trained) -> None:
    spread, single = trained["spread"], trained["single"]
    assert sorted(spread.report["worker_nodes"]) == sorted([cluster.a, cluster.b])  # rank 0 and 1 on each node
    assert single.report["worker_nodes"] == [cluster.a, cluster.a]
    assert spread.steps == single.steps == 1500 // 256 and spread.tokens == single.tokens
    assert str(spread.checkpoint).startswith("s3://multinode/train/spread/ray/")  # Ray Train's checkpoints on S3
    (name,) = spread.sae_dirs
    assert str(spread.sae_dirs[name]).startswith("s3://multinode/train/spread/")
    x, y = SparseAutoencoder.load(spread.sae_dirs[name]), SparseAutoencoder.load(single.sae_dirs[name])
    for key, value in x.state_dict().items():
        assert torch.isfinite(value).all(), key
        # the same data, seed, shards and gloo all-reduce of two ranks: equal up to float summation order
        torch.testing.assert_close(value, y.state_dict()[key], rtol=1e-5, atol=1e-6, msg=key)
    assert torch.isfinite(torch.tensor(spread.metrics[name]["train"]["mse"]))
    exact = all(torch.equal(v, y.state_dict()[k]) for k, v in x.state_dict().items())
    print(f"multi-node SAE weights {'bit-identical to' if exact else 'within 1e-5 of'} the single-node run")


def test_serve_replicas_on_two_nodes_answer_like_offline_decoding(
    cluster: Nodes, bucket: str, trained, tiny_lm_dir: Path
) -> None:
    (sae_dir,) = trained["spread"].sae_dirs.values()
    sae = SparseAutoencoder.load(sae_dir)
    model, tok = load_lm(str(tiny_lm_dir))
    d_sae = sae.W_dec.shape[0]
    gen = torch.Generator().manual_seed(0)
    vectors = {}
    for p in ("a", "b"):  # a few strong latents per perspective
        v = torch.zeros(d_sae)
        v[torch.randperm(d_sae, generator=gen)[:4]] = 8.0
        vectors[p] = v
    meta = VectorSetMeta(model=model_name(model), layer=LAYER, mode="sae", granularity="fine", task="test",
                         n_samples={"a": 1, "b": 1}, readout="test", dim=d_sae, sae_path=str(sae_dir),
                         sae_sha256=sae_file_hash(sae_dir), sae_fingerprint=sae_fingerprint(sae))  # fmt: skip
    vs = VectorSet(vectors, meta)
    registry = f"{bucket}/registry"  # the durable copy on S3; the replicas load the SAE from S3 too (sae_path)
    RegistryClient(registry).publish(vs, "multinode")
    port = _free_port()
    pin = {"head": {"head": 0.01}, "a": {"node_a": 0.01}, "b": {"node_b": 0.01}}
    cfg = ServeConfig.from_dict(
        {
            "vectors": "multinode", "registry_dir": registry, "model": str(tiny_lm_dir),
            "backend": "replicas", "port": port, "replica_cpus": 0.25, "aggregator_cpus": 0.1,
            "max_tokens_limit": 12, "default_max_tokens": 6, "max_perspectives": 2, "max_prompt_tokens": 128,
            "deployments": {
                "PluralAggregator": {"num_replicas": 1, "ray_actor_options": {"resources": pin["head"]}},
                "BaseModel": {"num_replicas": 1, "ray_actor_options": {"resources": pin["head"]}},
                "PerspectiveModel-a": {"num_replicas": 1, "ray_actor_options": {"resources": pin["a"]}},
                "PerspectiveModel-b": {"num_replicas": 1, "ray_actor_options": {"resources": pin["b"]}},
            },
        }
    )  # fmt: skip
    # one HTTP proxy, on the head: every node of a local cluster shares 127.0.0.1 and would bind the same port
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(cfg), name=cfg.app_name, route_prefix="/")
    nodes = {
        name: serve.get_deployment_handle(name, app_name=cfg.app_name).stats.remote().result()["node_id"]
        for name in ("PerspectiveModel-a", "PerspectiveModel-b", "BaseModel")
    }
    assert nodes == {"PerspectiveModel-a": cluster.a, "PerspectiveModel-b": cluster.b, "BaseModel": cluster.head}

    prompt = "The weather in the mountains today is"
    offline = plural_generate(model, tok, [prompt], vs, ["a", "b"], Decoding("dvd"), sae, max_new_tokens=6)
    r = httpx.post(
        f"http://127.0.0.1:{port}/v1/completions",
        json={"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 1},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert [s["id"] for s in choice["distributions"]] == offline.tokens[0]
    assert choice["text"] == offline.texts[0]
    first = {p: v[0]["logprob"] for p, v in choice["distributions"][0]["perspectives"].items()}
    assert set(first) == {"a", "b"}


@ray.remote(num_cpus=0)
class Where:
    """A process on one node: where it runs, and a file by a relative path written or read there."""

    def where(self) -> dict[str, Any]:
        return {
            "node": ray.get_runtime_context().get_node_id(),
            "cwd": os.getcwd(),
            "tmp": tempfile.gettempdir(),
            "cache": os.environ.get("PLURISTEER_CACHE"),
        }

    def write(self, relative: str, text: str) -> str:
        Path(relative).write_text(text)
        return str(Path(relative).resolve())

    def read(self, relative: str) -> str | None:
        return Path(relative).read_text() if Path(relative).exists() else None

    def remove(self, relative: str) -> None:
        Path(relative).unlink()


def test_nodes_share_no_disk_and_the_artifacts_live_only_in_the_bucket(
    cluster: Nodes, bucket: str, s3_server, stores, trained
) -> None:
    """After the spread runs above (collect, train and, run in order, serve): each node has its own working
    directory, temp dir and cache; a relative path written on one node is absent on the others; every live
    process of a node runs in that node's directory; and the spread runs' artifacts are in the bucket and
    on no node's disk, nor the driver's."""
    node_ids = {"head": cluster.head, "a": cluster.a, "b": cluster.b}
    pins = {"head": {"head": 0.01}, "a": {"node_a": 0.01}, "b": {"node_b": 0.01}}
    actors = {name: Where.options(resources=pin).remote() for name, pin in pins.items()}
    seen = {name: ray.get(actor.where.remote()) for name, actor in actors.items()}
    for name, where in seen.items():
        disk = cluster.disks[name]
        assert where == {
            "node": node_ids[name], "cwd": str(disk / "cwd"), "tmp": str(disk / "tmp"), "cache": str(disk / "cache"),
        }  # fmt: skip
    assert os.getcwd() == str(cluster.disks["driver"] / "cwd") and tempfile.gettempdir() == str(
        cluster.disks["driver"] / "tmp"
    )
    assert len({where["cwd"] for where in seen.values()} | {os.getcwd()}) == 4  # four working directories

    probe = "relative-probe.txt"
    assert ray.get(actors["a"].write.remote(probe, "written on node a")) == str(cluster.disks["a"] / "cwd" / probe)
    try:
        assert ray.get(actors["a"].read.remote(probe)) == "written on node a"
        assert ray.get(actors["b"].read.remote(probe)) is None  # the same relative path, another node: nothing
        assert ray.get(actors["head"].read.remote(probe)) is None and not Path(probe).exists()
    finally:
        ray.get(actors["a"].remove.remote(probe))
    for actor in actors.values():
        ray.kill(actor)

    for name, pid in cluster.raylets.items():  # the raylet and everything it started: workers, replicas, agents
        raylet = psutil.Process(pid)
        cwds = {}
        for proc in [raylet, *raylet.children(recursive=True)]:
            try:
                cwds[proc.pid] = proc.cwd()
            except psutil.NoSuchProcess:  # a worker that exited meanwhile
                continue
        assert len(cwds) > 1 and set(cwds.values()) == {str(cluster.disks[name] / "cwd")}, (name, cwds)

    fs = s3_server.filesystem()
    selector = pafs.FileSelector(bucket.removeprefix("s3://"), recursive=True)
    objects = [info.path for info in fs.get_file_info(selector) if info.type == pafs.FileType.File]
    names = {Path(o).name for o in objects}
    assert {"manifest.json", "shard-00000.parquet", "cfg.json", "sae_weights.safetensors", "training.json"} <= names
    assert any("/stores/spread/" in o for o in objects) and any("/train/spread/ray/" in o for o in objects)
    on_disks = [path for disk in cluster.disks.values() for path in disk.rglob("*")]
    strays = [p for p in on_disks if p.name in names or p.name.startswith(("pluristeer-put-", "pluristeer-get-"))]
    assert strays == [], strays  # no artifact and no upload's staging file left on any node's disk
    for name, disk in cluster.disks.items():
        assert list((disk / "cwd").rglob("*")) == [], name  # nothing written by a relative path anywhere
    print(f"{len(objects)} objects in {bucket}; on the nodes' own disks: {[str(p) for p in on_disks]}")


def test_worker_resources_and_placement_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cpus_per_worker / use_gpu"):
        _train_cfg(tmp_path, tmp_path, "auto", worker_resources={"CPU": 2})
    with pytest.raises(ConfigError, match="amounts >= 0"):
        _train_cfg(tmp_path, tmp_path, "auto", worker_resources={"slot": -1})
    with pytest.raises(ConfigError, match="placement_strategy"):
        _train_cfg(tmp_path, tmp_path, "auto", placement_strategy="SCATTER")
