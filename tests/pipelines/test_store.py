from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.store import (
    ActivationStore,
    Manifest,
    RunningStats,
    StoreError,
    StoreWriter,
    read_shard_metadata,
    write_shard,
)
from sae import storage


def _manifest(**kw) -> Manifest:
    base = {"model": "tiny", "layers": [1, 3], "d_model": 8, "dtype": "float32", "context_size": 16, "n_tokens": 50}
    return Manifest(**{**base, **kw})


def _make(root: Path, shard_rows=(20, 20, 10), dtype: str = "float32") -> dict[int, np.ndarray]:
    writer = StoreWriter(root, _manifest(dtype=dtype))
    rng = np.random.default_rng(0)
    full: dict[int, list[np.ndarray]] = {1: [], 3: []}
    stats = {1: RunningStats(8), 3: RunningStats(8)}
    start = 0
    for i, n in enumerate(shard_rows):
        acts = {layer: rng.standard_normal((n, 8)).astype(np.float32) for layer in (1, 3)}
        extra = {
            "token_id": np.arange(n, dtype=np.int32),
            "context": np.arange(start, start + n, dtype=np.int64),
            "position": np.ones(n, dtype=np.int16),
        }
        writer.record(write_shard(root, i, acts, extra, dtype))
        for layer in (1, 3):
            full[layer].append(acts[layer])
            stats[layer].update(acts[layer])
        start += n
    writer.finalize({str(k): v.to_dict() for k, v in stats.items()}, {"bos": True})
    return {k: np.concatenate(v) for k, v in full.items()}


def test_round_trip_and_stats(tmp_path: Path) -> None:
    full = _make(tmp_path)
    store = ActivationStore(tmp_path)
    store.verify()
    assert len(store) == 50 and store.layers == [1, 3]
    torch.testing.assert_close(store.read(3), torch.from_numpy(full[3]))
    np.testing.assert_allclose(store.stats(1)["mean"], full[1].mean(0), rtol=1e-6, atol=1e-9)
    assert store.read_column("context").tolist() == list(range(50))


def test_batches_cover_every_row_once_across_ranks(tmp_path: Path) -> None:
    full = _make(tmp_path)
    store = ActivationStore(tmp_path)
    rows = []
    for rank in range(2):
        for batch in store.iter_batches(1, 7, shuffle_window=16, seed=3, rank=rank, world_size=2, drop_last=False):
            assert batch.shape[1] == 8
            rows.append(batch)
    got = torch.cat(rows).numpy()
    assert got.shape == (50, 8)
    assert sorted(map(tuple, got.round(5))) == sorted(map(tuple, full[1].round(5)))
    first = next(store.iter_batches(1, 7, shuffle_window=16, seed=3))
    again = next(store.iter_batches(1, 7, shuffle_window=16, seed=3))
    torch.testing.assert_close(first, again)  # seeded


def test_fp16_storage(tmp_path: Path) -> None:
    full = _make(tmp_path, dtype="float16")
    store = ActivationStore(tmp_path)
    torch.testing.assert_close(store.read(1), torch.from_numpy(full[1].astype(np.float16).astype(np.float32)))


@pytest.mark.hostile
def test_incomplete_corrupt_and_mismatched_stores_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="manifest.json is missing"):
        ActivationStore(tmp_path)
    StoreWriter(tmp_path, _manifest())
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(tmp_path)
    with pytest.raises(StoreError, match="already holds a store"):
        StoreWriter(tmp_path, _manifest(layers=[2]))
    _make(tmp_path / "ok")
    shard = tmp_path / "ok" / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:200])
    store = ActivationStore(tmp_path / "ok")
    with pytest.raises(StoreError, match="sha256 mismatch"):
        store.verify()
    with pytest.raises(StoreError, match="truncated or corrupt"):
        store.read(1)
    with pytest.raises(StoreError, match="not 2"):
        store.read(2)


def test_every_rank_gets_the_same_number_of_batches(tmp_path: Path) -> None:
    _make(tmp_path)  # 3 shards: 20 + 20 + 10 rows
    store = ActivationStore(tmp_path)
    for world_size in (2, 3, 5):  # 5 ranks > 3 shards
        counts = [
            len(list(store.iter_batches(1, 4, shuffle_window=8, seed=0, rank=r, world_size=world_size)))
            for r in range(world_size)
        ]
        assert counts == [store.batches_per_epoch(4, world_size=world_size)] * world_size, counts
    assert store.rank_rows(0, 3, drop_last=False) == 17 and store.rank_rows(2, 3, drop_last=False) == 16


def test_shard_footer_metadata_and_leftovers(tmp_path: Path) -> None:
    writer = StoreWriter(tmp_path, _manifest())
    acts = {1: np.ones((2, 8), np.float32), 3: np.zeros((2, 8), np.float32)}
    extra = {"token_id": np.arange(2, dtype=np.int32)}
    info = write_shard(tmp_path, 0, acts, extra, "float32", metadata={"bos": 3})
    write_shard(tmp_path, 1, acts, extra, "float32")  # never recorded: a leftover
    (tmp_path / ".shard-00002.parquet.x.tmp").write_bytes(b"partial")
    writer.record(info)
    assert read_shard_metadata(tmp_path / info.name) == {"bos": 3}
    assert writer.remove_leftovers() == ["shard-00001.parquet", ".shard-00002.parquet.x.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "shard-00000.parquet"]
    stats = RunningStats(8)
    stats.update(acts[1])
    assert RunningStats.from_state(stats.state()).to_dict() == stats.to_dict()


def _extra(n: int) -> dict[str, np.ndarray]:
    return {
        "token_id": np.zeros(n, np.int32),
        "context": np.arange(n, dtype=np.int64),
        "position": np.ones(n, np.int16),
    }


def test_write_shard_refuses_values_beyond_the_dtype_and_non_finite_ones(tmp_path: Path) -> None:
    from pipelines.store import dtype_max

    assert dtype_max("float16") == 65504.0
    big = np.full((4, 8), 1.0, np.float32)
    big[2, 5] = 70_000.0
    with pytest.raises(StoreError) as info:
        write_shard(tmp_path, 3, {9: big}, _extra(4), "float16")
    assert "shard 3, layer 9: max |value| 70,000" in str(info.value) and "--set store_dtype=float32" in str(info.value)
    write_shard(tmp_path, 3, {9: big}, _extra(4), "float32")  # fits float32
    bad = big.copy()
    bad[0, 0] = np.nan
    with pytest.raises(StoreError, match=r"shard 4, layer 9: 1 non-finite values .* --set dtype=float32"):
        write_shard(tmp_path, 4, {9: bad}, _extra(4), "float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00003.parquet"]  # nothing else written


def test_manifest_records_the_dtype_choice(tmp_path: Path) -> None:
    choice = {"requested": "auto", "chosen": "float32", "max_abs_all": 90_000.0}
    StoreWriter(tmp_path, _manifest(dtype="float32", dtype_choice=choice))
    from pipelines.store import read_manifest

    assert read_manifest(tmp_path).dtype_choice == choice
    assert read_manifest(tmp_path).identity()["dtype"] == "float32"


# -- the same store on a real S3 server (moto, tests/s3_server.py) ----------------------------------------
def test_store_on_s3_reads_back_equal_to_a_local_one(s3_bucket: str, tmp_path: Path) -> None:
    uri = f"{s3_bucket}/stores/a"
    full = _make(uri)
    _make(tmp_path)
    remote, local = ActivationStore(uri), ActivationStore(tmp_path)
    remote.verify()
    assert remote.manifest.to_dict() == local.manifest.to_dict()  # same shards, rows and sha256s
    for layer in (1, 3):
        torch.testing.assert_close(remote.read(layer), local.read(layer))
        torch.testing.assert_close(remote.read(layer), torch.from_numpy(full[layer]))
    assert remote.read_column("context").tolist() == local.read_column("context").tolist()
    batches = [torch.cat(list(s.iter_batches(3, 5, shuffle_window=10, seed=1))) for s in (remote, local)]
    torch.testing.assert_close(*batches)
    assert remote.bytes_per_token() == local.bytes_per_token()
    assert storage.listdir(uri) == sorted(p.name for p in tmp_path.iterdir())  # nothing else, no temp file


def test_resume_on_s3_sees_only_recorded_shards(s3_bucket: str) -> None:
    uri = f"{s3_bucket}/stores/resume"
    writer = StoreWriter(uri, _manifest())
    acts = {1: np.ones((2, 8), np.float32), 3: np.zeros((2, 8), np.float32)}
    extra = {"token_id": np.arange(2, dtype=np.int32)}
    writer.record(write_shard(uri, 0, acts, extra, "float32", metadata={"bos": 1}))
    write_shard(uri, 1, acts, extra, "float32")  # uploaded, never recorded: a crash before the manifest
    storage.write_bytes(storage.join(uri, ".shard-00002.parquet.x.tmp"), b"partial")
    resumed = StoreWriter(uri, _manifest())
    assert sorted(resumed.done()) == [0]
    assert read_shard_metadata(storage.join(uri, "shard-00000.parquet")) == {"bos": 1}
    assert resumed.remove_leftovers() == ["shard-00001.parquet", ".shard-00002.parquet.x.tmp"]
    assert storage.listdir(uri) == ["manifest.json", "shard-00000.parquet"]
    with pytest.raises(StoreError, match=f"{uri} is incomplete"):
        ActivationStore(uri)


@pytest.mark.hostile
def test_missing_or_corrupt_objects_on_s3_are_store_errors_naming_the_uri(s3_bucket: str) -> None:
    with pytest.raises(StoreError, match=f"{s3_bucket}/nothing is not an activation store"):
        ActivationStore(f"{s3_bucket}/nothing")
    uri = f"{s3_bucket}/stores/bad"
    _make(uri)
    shard = storage.join(uri, "shard-00001.parquet")
    storage.write_bytes(shard, storage.read_bytes(shard)[:200])  # truncated in place
    store = ActivationStore(uri)
    with pytest.raises(StoreError, match=f"{shard}: sha256 mismatch"):
        store.verify()
    with pytest.raises(StoreError, match=f"{shard}: cannot read shard"):
        store.read(1)
    storage.delete(shard)
    with pytest.raises(StoreError, match=f"{uri}: shard shard-00001.parquet listed in the manifest is missing"):
        ActivationStore(uri)
    storage.write_bytes(storage.join(uri, "manifest.json"), b"{not json")
    with pytest.raises(StoreError, match=f"{uri}/manifest.json: not valid JSON"):
        ActivationStore(uri)
