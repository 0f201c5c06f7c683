from __future__ import annotations

from pathlib import Path

from pipelines.collect import CollectConfig, collect
from pipelines.store import ActivationStore


def test_actors_are_placed_on_both_nodes_of_a_two_node_cluster(tiny_lm_dir, data_root, tmp_path: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"collector": 1}, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1, resources={"collector": 1})
    try:
        cfg = CollectConfig.from_dict(
            {
                "model": str(tiny_lm_dir),
                "layers": [2],
                "context_size": 32,
                "n_tokens": 1500,
                "batch_size": 2,
                "contexts_per_shard": 4,
                "out": tmp_path / "store",
                "corpus": data_root / "corpus",
                "sources": ["ag_news"],
                "num_actors": 2,
                "actor_resources": {"collector": 1},  # one per node: each node has one unit
                "torch_threads": 1,
                "ray_address": cluster.address,
                "track": False,
            }
        )
        result = collect(cfg, echo=lambda _: None)
        node_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(node_ids) == 2 and result.nodes == node_ids  # both nodes computed shards
        store = ActivationStore(cfg.out)
        store.verify()
        assert len(store) == 1500 and store.read(2).shape == (1500, 64)
        assert store.manifest.config["num_actors"] == 2
    finally:
        ray.shutdown()
        cluster.shutdown()
