"""Hostile input on disk and in configs (docs/reliability.md §Hostile input): corrupt or truncated activation
stores, SAE directories and VectorSet files, and configs of the wrong types or ranges. Each must fail with the
module's own error naming the file or field to fix: never another exception from deep inside, never a hang."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file

from common.config import ConfigError, StageConfig
from pipelines.store import ActivationStore, StoreError, write_shard
from sae.model import SAEConfig, SAEFormatError, SparseAutoencoder
from sae.vectorset import VectorSet, VectorSetError, VectorSetMeta
from tests.conftest import REPO, synthetic_store

pytestmark = pytest.mark.hostile


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """Every case must answer within 30 s (a hang fails the test instead of stalling the suite)."""

    def timeout(_signum: int, _frame: Any) -> None:
        raise TimeoutError("hostile input made the reader hang")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# -- activation stores ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_store(tmp_path_factory.mktemp("hostile") / "store", rows=1024, shards=2)


def _manifest(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        path = root / "manifest.json"
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))

    return apply


def _shard(edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        path = root / "shard-00000.parquet"
        path.write_bytes(edit(path.read_bytes()))

    return apply


def _flip(data: bytes) -> bytes:
    out = bytearray(data)
    for i in range(200, min(len(out) - 100, 2200), 7):  # inside the first data page, clear of the footer
        out[i] ^= 0xFF
    return bytes(out)


def _other_columns(root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": list(range(512))}), root / "shard-00000.parquet")


def _narrow(root: Path) -> None:
    write_shard(root, 0, {3: np.zeros((512, 16), np.float32)}, {}, "float32")


STORE_CASES = [  # (id, corruption, what the error must say)
    ("manifest-empty", lambda r: (r / "manifest.json").write_text(""), "not valid JSON"),
    ("manifest-a-list", lambda r: (r / "manifest.json").write_text("[1, 2]"), "expected a JSON object"),
    ("manifest-unknown-field", _manifest(lambda m: {**m, "colour": 1}), "unexpected keyword argument 'colour'"),
    ("layers-a-string", _manifest(lambda m: {**m, "layers": "3"}), "layers must be a list"),
    ("d_model-a-string", _manifest(lambda m: {**m, "d_model": "x"}), "d_model must be a positive integer"),
    ("d_model-wrong", _manifest(lambda m: {**m, "d_model": 31}), "not 31 floats per row"),
    ("dtype-unknown", _manifest(lambda m: {**m, "dtype": "int8"}), "dtype must be one of"),
    ("future-format", _manifest(lambda m: {**m, "format_version": 99}), "format_version 99"),
    ("shard-entry-incomplete", _manifest(lambda m: {**m, "shards": [{"index": 0}]}), "missing 3 required"),
    ("shard-path-traversal", _manifest(lambda m: {**m, "shards": [{**m["shards"][0], "name": "../x.parquet"}]}),
     "'../x.parquet' is not named"),
    ("rows-overstated", _manifest(lambda m: {**m, "shards": [{**s, "rows": s["rows"] + 5} for s in m["shards"]]}),
     "512 rows, the manifest says 517"),
    ("rows-understated", _manifest(lambda m: {**m, "shards": [{**s, "rows": s["rows"] - 5} for s in m["shards"]]}),
     "512 rows, the manifest says 507"),
    ("shard-missing", lambda r: (r / "shard-00000.parquet").unlink(), "shard-00000.parquet listed in the manifest"),
    ("shard-empty", _shard(lambda b: b""), "truncated or corrupt"),
    ("shard-truncated", _shard(lambda b: b[: len(b) // 2]), "truncated or corrupt"),
    ("shard-bits-flipped", _shard(_flip), "CRC checksum verification failed"),
    ("shard-other-columns", _other_columns, "No match for FieldRef.Name(layer_3)"),
    ("shard-narrower-rows", _narrow, "not 32 floats per row"),
]  # fmt: skip


@pytest.mark.parametrize(("corrupt", "message"), [c[1:] for c in STORE_CASES], ids=[c[0] for c in STORE_CASES])
def test_corrupt_stores_name_the_file(small_store: Path, tmp_path: Path, corrupt, message: str) -> None:
    root = tmp_path / "store"
    shutil.copytree(small_store, root)
    corrupt(root)
    with pytest.raises(StoreError) as err:  # opening, reading everything and the training reader
        store = ActivationStore(root)
        store.read(3)
        list(store.iter_batches(3, 64, shuffle_window=256))
    text = str(err.value)
    assert message in text, text
    assert str(root) in text and ("manifest.json" in text or "shard-0000" in text or "incomplete" in text), text


def test_a_bit_flip_is_also_caught_by_verify(small_store: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    shutil.copytree(small_store, root)
    ActivationStore(root).verify()
    _shard(_flip)(root)
    with pytest.raises(StoreError, match="shard-00000.parquet: sha256 mismatch"):
        ActivationStore(root).verify()


def test_the_train_command_reports_a_corrupt_store_without_a_traceback(small_store: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    shutil.copytree(small_store, root)
    _manifest(lambda m: {**m, "d_model": -4})(root)
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "pluristeer.cli", "train", "--set", f"store={root}", "--set", "track=false"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "d_model must be a positive integer, got -4" in proc.stderr and "Traceback" not in proc.stderr


# -- SAE directories -----------------------------------------------------------------------------------
def _weights(**tensors: torch.Tensor) -> Callable[[Path], None]:
    full = {
        "W_enc": torch.zeros(32, 64),
        "b_enc": torch.zeros(64),
        "W_dec": torch.zeros(64, 32),
        "b_dec": torch.zeros(32),
    }

    def apply(root: Path) -> None:
        save_file({**full, **tensors}, root / "sae_weights.safetensors")

    return apply


def _cfg(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        path = root / "cfg.json"
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))

    return apply


def _bytes(name: str, edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    return lambda root: (root / name).write_bytes(edit((root / name).read_bytes()))


W, C = "sae_weights.safetensors", "cfg.json"
SAE_CASES = [
    ("cfg-missing", lambda r: (r / C).unlink(), C, "cfg.json is missing"),
    ("cfg-not-json", _bytes(C, lambda b: b"{not json"), C, "not valid JSON"),
    ("cfg-binary", _bytes(C, lambda b: b"\xff\xfe\x00"), C, "not valid JSON"),
    ("cfg-a-list", _cfg(lambda c: [c]), C, "expected a JSON object"),
    ("metadata-a-string", _cfg(lambda c: {**c, "metadata": "x"}), C, "metadata must be a JSON object"),
    ("k-a-string", _cfg(lambda c: {**c, "k": "abc", "metadata": {}}), C, "k must be an integer, got 'abc'"),
    ("k-above-d_sae", _cfg(lambda c: {**c, "metadata": {"pluristeer": {"architecture": "topk", "k": 999}}}), C,
     "k must be in 1..d_sae=64"),
    ("architecture-unknown", _cfg(lambda c: {**c, "architecture": "gated", "metadata": {}}), C,
     "unsupported SAE architecture 'gated'"),
    ("weights-missing", lambda r: (r / W).unlink(), W, "sae_weights.safetensors is missing"),
    ("weights-empty", _bytes(W, lambda b: b""), W, "truncated or corrupt"),
    ("weights-truncated", _bytes(W, lambda b: b[:100]), W, "truncated or corrupt"),
    ("weights-header-huge", _bytes(W, lambda b: struct.pack("<Q", 1 << 62) + b"{}"), W, "header too large"),
    ("weights-header-flipped", _bytes(W, lambda b: b[:20] + bytes([b[20] ^ 0xFF]) + b[21:]), W, "truncated or corrupt"),
    ("tensor-missing", lambda r: save_file({"W_enc": torch.zeros(32, 64)}, r / W), W, "no tensor 'b_enc'"),
    ("tensor-1d", _weights(W_enc=torch.zeros(32)), W, "W_enc has shape (32,); expected 2 dimension(s)"),
    ("tensor-integer", _weights(W_enc=torch.zeros(32, 64, dtype=torch.int32)), W, "W_enc has dtype torch.int32"),
    ("tensor-nan", _weights(W_dec=torch.full((64, 32), math.nan)), W, "W_dec contains NaN or infinite"),
    ("tensor-shape-mismatch", _weights(W_dec=torch.zeros(64, 31)), W, "W_dec has shape (64, 31)"),
]  # fmt: skip


@pytest.mark.parametrize(("corrupt", "file", "message"), [c[1:] for c in SAE_CASES], ids=[c[0] for c in SAE_CASES])
def test_corrupt_sae_directories_name_the_file(tmp_path: Path, corrupt, file: str, message: str) -> None:
    torch.manual_seed(0)
    SparseAutoencoder(SAEConfig(d_in=32, d_sae=64, k=4)).save(tmp_path)
    corrupt(tmp_path)
    with pytest.raises(SAEFormatError) as err:
        SparseAutoencoder.load(tmp_path)
    text = str(err.value)
    assert message in text and str(tmp_path) in text and (file in text or "SAE directory" in text), text


# -- VectorSet files -----------------------------------------------------------------------------------
META = {"model": "m", "layer": 3, "mode": "caa", "granularity": "fine", "task": "chat", "n_samples": {"a": 1, "b": 1},
        "readout": "last", "dim": 8}  # fmt: skip
GOOD = {"a": torch.ones(8), "b": torch.zeros(8)}


def _set(meta: Any = None, tensors: dict[str, torch.Tensor] | None = None, raw: str | None = None) -> bytes:
    full = json.dumps({**dataclasses.asdict(VectorSetMeta(**META)), **(meta or {})}) if raw is None else raw
    return safetensors_bytes(tensors or GOOD, metadata={"pluristeer": full})


VS_CASES = [
    ("empty", b"", "not a readable safetensors file"),
    ("truncated", _set()[:-10], "not a readable safetensors file"),
    ("header-a-list", struct.pack("<Q", 3) + b"[1]", "not a readable safetensors file"),
    ("not-a-vector-set", safetensors_bytes(GOOD), "no 'pluristeer' metadata"),
    ("metadata-not-json", _set(raw="{x"), "malformed vector-set metadata"),
    ("metadata-a-list", _set(raw="[1]"), "malformed vector-set metadata"),
    ("metadata-unknown-field", _set({"colour": 1}), "unexpected keyword argument 'colour'"),
    ("layer-a-string", _set({"layer": "x"}), "layer must be a non-negative integer"),
    ("dim-a-string", _set({"dim": "8"}), "dim must be a non-negative integer"),
    ("n_samples-a-number", _set({"n_samples": 3}), "n_samples and extra must be JSON objects"),
    ("mode-unknown", _set({"mode": "x"}), "mode must be one of"),
    ("future-format", _set({"format_version": 9}), "format_version 9 is newer"),
    ("vector-2d", _set(tensors={"a": torch.ones(2, 4), "b": torch.zeros(8)}), "vector 'a' has shape (2, 4)"),
    ("vector-wrong-length", _set(tensors={"a": torch.ones(7), "b": torch.zeros(8)}), "expected [8]"),
    ("vector-nan", _set(tensors={"a": torch.full((8,), math.nan), "b": torch.zeros(8)}), "'a' contains NaN"),
    ("vector-inf", _set(tensors={"a": torch.ones(8), "b": torch.full((8,), math.inf)}), "'b' contains NaN"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "message"), [c[1:] for c in VS_CASES], ids=[c[0] for c in VS_CASES])
def test_corrupt_vector_sets_name_the_file(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "set.safetensors"
    path.write_bytes(data)
    with pytest.raises(VectorSetError) as err:
        VectorSet.load(path)
    assert message in str(err.value) and str(path) in str(err.value), str(err.value)


def test_a_good_vector_set_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "set.safetensors"
    path.write_bytes(_set())
    vs = VectorSet.load(path)
    assert vs.perspectives == ["a", "b"] and torch.equal(vs["a"], torch.ones(8))


# -- configs -------------------------------------------------------------------------------------------
def _stage_configs() -> list[type[StageConfig]]:
    from pipelines.collect import CollectConfig
    from pipelines.evaluate import EvalConfig
    from pipelines.explain import ExplainConfig
    from pipelines.train import TrainConfig
    from pipelines.vectors import VectorConfig
    from serve.config import ServeConfig

    return [CollectConfig, TrainConfig, VectorConfig, EvalConfig, ExplainConfig, ServeConfig]


HOSTILE = [None, True, -1, 0, 2**63, -1.5, math.nan, math.inf, -math.inf, 1e308, "", "x", "4,8", "[1, x]", "nan",
           "../../etc/passwd", "\x00", "üü", "\ud800", [], [None], [-3], ["a", "a"], {}, {"a": 1},
           {"a": [1]}]  # fmt: skip


def test_every_stage_config_rejects_bad_values_by_field() -> None:
    """Every field of every stage config × hostile values: accepted, or a ConfigError naming the file; an
    accepted float is finite (NaN passes range checks written as ``x > 0`` by failing ``x <= 0`` nowhere)."""
    tried = rejected = 0
    for cls in _stage_configs():
        base = {"vectors": "x"} if cls.__name__ in ("ServeConfig", "ExplainConfig") else {}
        for f in dataclasses.fields(cls):
            for value in HOSTILE:
                tried += 1
                try:
                    cfg = cls.from_dict({**base, f.name: value}, where="stage.yaml")
                except ConfigError as err:
                    rejected += 1
                    assert str(err).startswith("stage.yaml: "), (cls.__name__, f.name, value, str(err))
                    continue
                got = getattr(cfg, f.name)
                assert not (isinstance(got, float) and not math.isfinite(got)), (cls.__name__, f.name, value)
    assert tried > 2000 and rejected > tried // 2, (tried, rejected)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr", "-0.001", "lr: must be > 0, got -0.001"),
        ("lr", ".nan", "lr: expected a finite number, got nan"),
        ("epochs", ".inf", "epochs: expected a finite number"),
        ("keep_checkpoints", "0", "keep_checkpoints: must be >= 1, got 0"),
        ("dead_tokens", "-1", "dead_tokens: must be >= 1, got -1"),
        ("shuffle_window", "-1", "shuffle_window: must be >= 0, got -1 (0: no shuffling)"),
        ("auxk_coefficient", "-1", "auxk_coefficient: must be >= 0, got -1"),
        ("expansions", "[1, x]", "expansions[1]: expected a number, got 'x'"),
        ("workers", "two", "workers: expected an integer"),
    ],
)
def test_train_config_ranges(field: str, value: str, message: str) -> None:
    from pipelines.train import TrainConfig

    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig.load(None, [f"{field}={value}"])


@pytest.mark.parametrize(
    ("stage", "old", "new"),
    [("CollectConfig", "wandb", "track"), ("TrainConfig", "output_dir", "out"), ("TrainConfig", "tokens", "n_tokens"),
     ("VectorConfig", "data", "task"), ("EvalConfig", "pd_alpha_mislc", "task_alphas")],
)  # fmt: skip
def test_an_old_field_name_says_what_it_was_renamed_to(stage: str, old: str, new: str) -> None:
    """One name per concept across stages (out, track, n_tokens): a config with the old name is told the new."""
    cls = next(c for c in _stage_configs() if c.__name__ == stage)
    assert new in {f.name for f in dataclasses.fields(cls)} and old not in {f.name for f in dataclasses.fields(cls)}
    with pytest.raises(ConfigError, match=re.escape(f"{old}: renamed to {new}")):
        cls.load(None, [f"{old}=1"])


def test_fuzzed_overrides_only_raise_config_errors() -> None:
    """Hypothesis: arbitrary text as ``--set field=...`` for every field of every stage config."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    configs = _stage_configs()
    fields = [(cls, f.name) for cls in configs for f in dataclasses.fields(cls)]
    outcomes: list[str] = []

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(pick=st.sampled_from(fields), text=st.text(max_size=24))
    def check(pick: tuple[type[StageConfig], str], text: str) -> None:
        cls, name = pick
        base = ["vectors=x"] if cls.__name__ in ("ServeConfig", "ExplainConfig") else []
        try:
            cls.load(None, [*base, f"{name}={text}"])
            outcomes.append("ok")
        except ConfigError as err:
            assert str(err).startswith(f"{cls.__name__}: ") or "override" in str(err), str(err)
            outcomes.append("rejected")

    check()
    assert "ok" in outcomes and "rejected" in outcomes
