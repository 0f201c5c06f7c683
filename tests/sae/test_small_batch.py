"""The transposed matmul path for few-row forwards (sae/small_batch.py): the same outputs as F.linear, taken
only for 2..max_rows rows, undone cleanly, and kept by tune() only when it measured faster."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sae import small_batch
from tests.conftest import tiny_model


def test_a_linear_gives_what_f_linear_gives_and_takes_the_path_only_for_a_few_rows() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(24, 40, bias=True)
    calls: list[int] = []
    real = torch.Tensor.__matmul__

    def spy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append(b.shape[-1])
        return real(a, b)

    for shape in [(1, 1, 24), (2, 1, 24), (4, 24), (1, 3, 24), (5, 1, 24), (2, 7, 24)]:
        x = torch.randn(*shape)
        want = layer(x)
        with small_batch.small_batches(layer, max_rows=4):
            calls.clear()
            torch.Tensor.__matmul__ = spy
            try:
                got = layer(x)
            finally:
                torch.Tensor.__matmul__ = real
        rows = x.numel() // 24
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert calls == ([rows] if 2 <= rows <= 4 else []), shape  # W @ x.T for 2..4 rows, F.linear otherwise
    assert not small_batch.patched(layer) and "forward" not in layer.__dict__


def test_a_patched_model_decodes_as_before_and_unpatches() -> None:
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (4, 6), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model(ids).logits[:, -1]
        step_want = model(ids[:, -1:]).logits
        n = small_batch.patch(model)
        assert n == sum(type(m) is nn.Linear for m in model.modules()) and small_batch.patched(model)
        got, step = model(ids).logits[:, -1], model(ids[:, -1:]).logits  # 24 rows (plain), 4 rows (transposed)
        small_batch.unpatch(model)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step, step_want, atol=1e-5, rtol=1e-5)
    assert not small_batch.patched(model)
    with pytest.raises(ValueError, match="max_rows"):
        small_batch.patch(model, max_rows=1)


def test_tune_keeps_the_path_only_if_it_measured_faster_and_leaves_other_dtypes_alone() -> None:
    model = tiny_model("llama")
    t = small_batch.tune(model, rows=4, reps=3)
    assert t.plain_ms > 0 and t.transposed_ms > 0 and t.rows == 4
    assert t.used == (t.transposed_ms < 0.95 * t.plain_ms) == small_batch.patched(model)
    assert ("on" if t.used else "off") in t.describe()
    half = copy.deepcopy(model).to(torch.bfloat16)
    untouched = small_batch.tune(half)
    assert not untouched.used and untouched.plain_ms == 0 and not small_batch.patched(half)
