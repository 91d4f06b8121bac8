"""The PyTorch path: the reference semantics of every op, and what CPU users run.

Two things live here:

* the four sparse primitives that the autograd Functions in ``ops.py`` are built from, with the same
  signatures as the Triton launchers in ``triton_ops.py`` (``encode_select``, ``gather_rows``,
  ``gather_dot``, ``scatter_outer``). They never build an ``N x k x d_model`` tensor and never scatter
  the top-k values back into a dense ``N x d_sae`` matrix: decoding is an ``embedding_bag``, the
  per-latent reductions are one CSR sparse-dense product.
* ``dense_topk_sae``: the textbook dense TopK SAE (linear, ReLU, weighted top-k, scatter, matmul) with
  plain autograd. Tests evaluate it in float64 as the ground truth and benchmarks use it as the
  dense baseline.
"""
from __future__ import annotations

from typing import Optional, Tuple

import warnings

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

# Bound on the elements of a temporary in gather_dot (16 MiB of fp32): memory grows with k, not d_sae.
_CHUNK_ELEMS = 1 << 22


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def encode_select(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, dec_norm: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    """Per row, the k latents with the largest ``relu(x @ W_enc.T + b_enc) * dec_norm``.

    Returns the kept values ``relu(pre)`` (not the weighted scores) and int64 indices, both ``[N, k]``.
    The ``N x d_sae`` pre-activations are the one unavoidable dense intermediate of this path.
    """
    z = torch.addmm(b_enc, x, W_enc.t()).relu_()
    score = z if dec_norm is None else z * dec_norm.to(z.dtype)
    _, indices = torch.topk(score, k, dim=1, sorted=False)
    return z.gather(1, indices), indices


def gather_rows(values: Tensor, indices: Tensor, W: Tensor) -> Tensor:
    """``out[t] = sum_j values[t, j] * W[indices[t, j]]`` with fp32 accumulation, in ``W.dtype``."""
    acc = _acc_dtype(W.dtype)
    out = F.embedding_bag(
        indices, W.to(acc), per_sample_weights=values.to(acc), mode="sum"
    )
    return out.to(W.dtype)


def gather_dot(grad_out: Tensor, indices: Tensor, W: Tensor) -> Tensor:
    """``out[t, j] = <grad_out[t], W[indices[t, j]]>``, in ``grad_out.dtype``.

    Chunked over tokens so the gathered rows never exceed ``_CHUNK_ELEMS`` elements.
    """
    N, k = indices.shape
    d = W.shape[1]
    acc = _acc_dtype(grad_out.dtype)
    out = torch.empty(N, k, dtype=acc, device=grad_out.device)
    rows = max(1, _CHUNK_ELEMS // max(1, k * d))
    Wa = W.to(acc)
    for s in range(0, N, rows):
        e = min(N, s + rows)
        torch.bmm(
            Wa[indices[s:e]], grad_out[s:e].to(acc).unsqueeze(2), out=out[s:e].unsqueeze(2)
        )
    return out.to(grad_out.dtype)


def latent_csr(indices: Tensor, n_rows: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Reverse map from latents to their (token, slot) entries, in CSR form, built deterministically.

    Returns ``(crow [n_rows + 1], order [N*k], token [N*k])``: the entries of latent ``i`` are
    ``order[crow[i]:crow[i+1]]`` (positions in the flattened ``[N, k]`` arrays), sorted by position.
    """
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_rows)
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(counts, 0, out=crow[1:])
    token = torch.div(order, indices.shape[1], rounding_mode="floor")
    return crow, order, token


def scatter_outer(
    values: Tensor, indices: Tensor, Y: Tensor, n_rows: int, with_sum: bool
) -> Tuple[Tensor, Optional[Tensor]]:
    """``dW[i] = sum_{(t, j): indices[t, j] = i} values[t, j] * Y[t]`` (and the sums of values).

    One CSR (latents x tokens) times dense product: deterministic, fp32 accumulation, and the
    ``N x k x d`` outer products are never formed.
    """
    N, k = indices.shape
    acc = _acc_dtype(Y.dtype)
    crow, order, token = latent_csr(indices, n_rows)
    vals = values.reshape(-1)[order].to(acc)
    G = torch.sparse_csr_tensor(crow, token, vals, size=(n_rows, N), check_invariants=False)
    dW = (G @ Y.to(acc)).to(Y.dtype)
    dsum = None
    if with_sum:
        dsum = torch.segment_reduce(vals, "sum", offsets=crow, axis=0) if vals.numel() else torch.zeros(
            n_rows, dtype=acc, device=values.device
        )
        dsum = dsum.to(values.dtype)
    return dW, dsum


# --------------------------------------------------------------------------------------------------
# The dense textbook SAE: ground truth for tests (in float64) and the dense baseline for benchmarks.
# --------------------------------------------------------------------------------------------------


def dense_topk_sae(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    k: int,
    weighted: bool = True,
    indices: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Dense TopK SAE forward with plain autograd: returns ``(x_hat, f_dense, indices)``.

    ``indices`` (optional, ``[N, k]``) fixes the selection instead of computing it, so gradients of
    another implementation can be compared on exactly the same support even at near-ties.
    """
    pre = x @ W_enc.t() + b_enc
    z = torch.relu(pre)
    if indices is None:
        score = z * W_dec.detach().norm(dim=1) if weighted else z
        indices = torch.topk(score.detach(), k, dim=1).indices
    mask = torch.zeros_like(z).scatter(1, indices, 1.0)
    f = z * mask
    x_hat = f @ W_dec + b_dec
    return x_hat, f, indices
