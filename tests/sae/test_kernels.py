from __future__ import annotations

import pytest
import torch

from sae.kernels import SparsePlan, gather_dot, sparse_decode, topk_encode, topk_select


@pytest.mark.parametrize(("m", "k"), [(4608, 32), (1024, 8), (96, 5)])
def test_topk_select_is_exact(m: int, k: int) -> None:
    torch.manual_seed(0)
    pre = torch.randn(64, m)
    pre[0, :] = 0.0  # all ties
    pre[1, : 8 * k] += 10  # the winners crowd into a few strided groups
    values, indices = topk_select(pre, k)
    reference = pre.topk(k, dim=-1).values
    torch.testing.assert_close(values.sort(-1).values, reference.sort(-1).values)
    torch.testing.assert_close(pre.gather(1, indices), values)
    assert all(len(set(row.tolist())) == k for row in indices)


def test_gather_dot_matches_a_dense_product() -> None:
    torch.manual_seed(0)
    dense, weight = torch.randn(10, 16), torch.randn(50, 16)
    idx = torch.randint(0, 50, (10, 7))
    torch.testing.assert_close(gather_dot(dense, weight, idx), torch.einsum("nd,nkd->nk", dense, weight[idx]))


@pytest.mark.parametrize(
    ("dtype", "low_precision", "backend"),
    [
        (torch.float64, None, "csr"),
        (torch.float32, None, "csr"),
        (torch.float32, None, "dense"),
        (torch.float32, torch.bfloat16, "csr"),
    ],
)
def test_sparse_topk_sae_matches_dense_autograd(
    dtype: torch.dtype, low_precision: torch.dtype | None, backend: str
) -> None:
    torch.manual_seed(0)
    n, d, m, k = 64, 16, 128, 5
    x = torch.randn(n, d, dtype=dtype)
    W = torch.randn(m, d, dtype=dtype).requires_grad_()
    b_enc = (0.1 * torch.randn(m, dtype=dtype)).requires_grad_()
    b_dec = torch.randn(d, dtype=dtype).requires_grad_()
    W_dec = torch.randn(m, d, dtype=dtype).requires_grad_()
    params = (W, b_enc, b_dec, W_dec)

    plan = SparsePlan(m, backend)  # type: ignore[arg-type]
    vals, idx = topk_encode(x, W, b_enc, b_dec, k, plan, low_precision)
    out = sparse_decode(vals, idx, W_dec, plan) + b_dec
    ((out - x).pow(2).sum()).backward()
    ours = [p.grad.clone() for p in params]  # type: ignore[union-attr]
    for p in params:
        p.grad = None

    pre = (x - b_dec) @ W.T + b_enc
    mask = torch.zeros_like(pre).scatter_(1, idx, 1.0)  # the same latents (bf16 may pick near-ties differently)
    reference = (pre * mask).relu() @ W_dec + b_dec
    ((reference - x).pow(2).sum()).backward()
    tol = {"atol": 1e-3, "rtol": 1e-4} if dtype == torch.float32 else {}  # float32 sums in another order
    torch.testing.assert_close(out, reference, **tol)
    for got, want in zip(ours, [p.grad for p in params], strict=True):
        torch.testing.assert_close(got, want, **tol)
    if low_precision is None:  # exact selection: the top-k of the float pre-activations
        torch.testing.assert_close(vals.sort(-1).values, pre.topk(k).values.relu().sort(-1).values)
