"""Shared fixtures: tiny random models for shape tests, the embedded model where behaviour matters."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def tiny_config(family: str = "llama", **overrides):
    """A config for a tiny randomly initialised causal LM of ``family``."""
    import transformers as tf

    common = {"vocab_size": 256, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
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
        cfg = tf.GemmaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=256,
            **common,
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
def embedded_sae(embedded, data_root):
    """TEST FIXTURE SAE (see tests/sae_fixture.py, not the product trainer): TopK 8x k=32 at layer 15 of the
    embedded model, fitted on ~8k corpus tokens and cached; ``PLURISTEER_TEST_SAE`` swaps in a real one."""
    from tests.sae_fixture import fixture_sae

    model, tokenizer = embedded
    return fixture_sae(model, tokenizer, data_root / "corpus")
