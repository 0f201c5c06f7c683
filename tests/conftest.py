"""Shared fixtures: tiny random models for shape tests, the embedded model where behaviour matters."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.store import ActivationStore, read_shard_table
from sae import storage

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Markers (registered here, beside the ``slow`` one in pyproject.toml): ``-m fault`` runs the fault
    injection tests alone, ``-m hostile`` the bad-input ones, ``-m security`` the security checks."""
    config.addinivalue_line("markers", "fault: kills a process or actor mid-run and checks nothing was lost")
    config.addinivalue_line("markers", "hostile: feeds corrupt, truncated or mistyped input and checks the error")
    config.addinivalue_line("markers", "security: checks what is loaded from disk, logged and exposed")


def tiny_config(family: str = "llama", **overrides):
    """A config for a tiny randomly initialised causal LM of ``family``."""
    import transformers as tf

    common = {"vocab_size": 256, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    gemma = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
             "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 256, **common}  # fmt: skip
    if family == "llama":
        cfg = tf.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **common,
        )
    elif family == "qwen2":
        cfg = tf.Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **common,
        )
    elif family == "gemma":
        cfg = tf.GemmaConfig(**gemma)
    elif family == "gemma3":  # sliding-window attention in two of three layers, as Gemma 3 has
        cfg = tf.Gemma3TextConfig(
            **gemma, sliding_window=16, layer_types=["sliding_attention", "sliding_attention", "full_attention"]
        )
    elif family == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=256, **common)
    elif family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=256,
            **common,
        )
    elif family == "opt":
        cfg = tf.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
            **common,
        )
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(family: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def embedded():
    """``(model, tokenizer)`` of the embedded SmolLM2-135M-Instruct (converted once per cache)."""
    from sae.lm import load_lm

    return load_lm("embedded")


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared data directory; the suite fails (does not skip) without it."""
    root = Path(os.environ.get("PLURISTEER_DATA", REPO.parent / "shared" / "data"))
    assert root.is_dir(), f"data directory {root} is missing: set PLURISTEER_DATA"
    return root


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved with the embedded model's tokenizer (loadable by ``load_lm(path)``)."""
    from transformers import AutoModelForCausalLM

    from sae.lm import load_tokenizer

    path = tmp_path_factory.mktemp("tiny-lm")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=49152))
    model.save_pretrained(path)
    load_tokenizer("embedded").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def huge_lm_dir(tiny_lm_dir, tmp_path_factory) -> Path:
    """The tiny Llama with its embeddings scaled 10^6x: residual entries reach ~10^5, beyond float16's 65,504
    (as some real families' residual norms in the thousands do), while the logits stay finite (RMSNorm)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("huge-lm")
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1e6)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_lm_dir).save_pretrained(path)
    return path


def synthetic_store(
    root: Path,
    *,
    d: int = 32,
    n_features: int = 256,
    active: float = 4.0,
    rows: int = 8192,
    shards: int = 4,
    layer: int = 3,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """A complete activation store of sparse synthetic activations: each row is a few of ``n_features``
    random unit directions with exponential weights, plus an offset and noise (for SAE training tests)."""
    from pipelines.store import Manifest, RunningStats, StoreWriter, write_shard

    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((n_features, d)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    offset = rng.standard_normal(d).astype(np.float32) * 2
    manifest = Manifest(model="synthetic", layers=[layer], d_model=d, dtype=dtype, context_size=64, n_tokens=rows)
    writer = StoreWriter(root, manifest)
    stats = RunningStats(d)
    per = rows // shards
    for i in range(shards):
        z = (rng.random((per, n_features)) < active / n_features) * rng.exponential(2.0, (per, n_features))
        x = (z @ atoms + offset + 0.05 * rng.standard_normal((per, d))).astype(np.float32)
        extra = {
            "token_id": np.zeros(per, np.int32),
            "context": np.arange(i * per, (i + 1) * per, dtype=np.int64),
            "position": np.ones(per, np.int16),
        }
        writer.record(write_shard(root, i, {layer: x}, extra, dtype))
        stats.update(x)
    writer.finalize({str(layer): stats.to_dict()}, {"synthetic": True})
    return root


def content_hash(root: storage.Location) -> str:
    """sha256 over every column of every shard of the complete store at ``root`` (a path or a URI), in shard
    order: equal for equal contents whatever the Parquet file bytes."""
    digest = hashlib.sha256()
    for shard in ActivationStore(root).manifest.shards:
        table = read_shard_table(storage.join(root, shard.name))
        for name in sorted(table.column_names):
            column = table.column(name).combine_chunks()
            values = column.values if hasattr(column, "values") else column
            digest.update(name.encode() + np.ascontiguousarray(values.to_numpy(zero_copy_only=False)).tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 8192-row, 4-shard synthetic store of 32-dim activations at layer 3 (read-only: do not write to it)."""
    return synthetic_store(tmp_path_factory.mktemp("tiny_store") / "store")


@pytest.fixture
def one_thread():
    """Run the test with one intra-op thread (small ops are far slower with two on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def embedded_sae(embedded, data_root):
    """TEST FIXTURE SAE (see tests/sae_fixture.py, not the product trainer): TopK 8x k=32 at layer 15 of the
    embedded model, fitted on ~8k corpus tokens and cached; ``PLURISTEER_TEST_SAE`` swaps in a real one."""
    from tests.sae_fixture import fixture_sae

    model, tokenizer = embedded
    return fixture_sae(model, tokenizer, data_root / "corpus")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (moto, tests/s3_server.py) on 127.0.0.1 at a free port, for the whole session."""
    from tests.s3_server import S3Server

    with S3Server() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """``s3://<fresh bucket>`` on :func:`s3_server`, with the ``AWS_*`` environment pointing at it."""
    import re
    import uuid

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    stem = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    return s3_server.create_bucket(f"{stem}-{uuid.uuid4().hex[:8]}")
