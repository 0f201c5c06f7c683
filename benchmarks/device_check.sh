#!/usr/bin/env bash
# GPU proof run for a lent CUDA machine (see README "GPU checks"): SAE training tokens/s and MFU (plain,
# DeepSpeed ZeRO, Ray Train + DeepSpeed), then a Ray Data collection on the GPU with a tiny random Llama.
# Needs the wheels of ray/deepspeed/... in .gpubundle/ (not committed): whl/*.whl and ray312.tar.xz.
set -uo pipefail
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT" /tmp/site
if [ -d .gpubundle ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpubundle/whl/*.whl
  tar xJf .gpubundle/ray312.tar.xz -C /tmp/site
fi
export PYTHONPATH=/tmp/site:. RAY_USAGE_STATS_ENABLED=0 WANDB_MODE=disabled HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, ray, deepspeed; print('torch', torch.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__)"
timeout "${TRAIN_TIMEOUT:-330}" python3 benchmarks/train_gpu.py --budget "${TRAIN_BUDGET:-280}" 2>&1 | tee "$OUT/train_gpu.log"
# Collection on the GPU: tiny random Llama + a small text corpus, one actor with num_gpus=1.
python3 - <<'PY' 2>&1 | tee "$OUT/collect_gpu.log"
import json, time, tempfile, pathlib, torch
from transformers import LlamaConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers
root = pathlib.Path(tempfile.mkdtemp())
words = [f"w{i}" for i in range(500)]
tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(root / "lm")
cfg = LlamaConfig(vocab_size=503, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=2)
torch.manual_seed(0); AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "lm")
(root / "corpus").mkdir()
g = torch.Generator().manual_seed(0)
for d in range(40):
    (root / "corpus" / f"{d}.txt").write_text(" ".join(words[i] for i in torch.randint(0, 500, (3000,), generator=g)))
from pipelines.collect import CollectConfig, collect
c = CollectConfig.from_dict({"model": str(root / "lm"), "layers": [1, 3], "n_tokens": int(__import__("os").environ.get("COLLECT_TOKENS", "100000")), "context_size": 128,
    "batch_size": 64, "out": str(root / "store"), "corpus": str(root / "corpus"), "device": __import__("os").environ.get("COLLECT_DEVICE", "cuda"), "track": False})
t = time.perf_counter(); res = collect(c); dt = time.perf_counter() - t
from pipelines.store import ActivationStore
s = ActivationStore(root / "store"); s.verify()
print(json.dumps({"collect_gpu_rows": len(s), "seconds": round(dt, 1), "rows_per_s": round(len(s) / dt), "layers": s.layers}))
PY
