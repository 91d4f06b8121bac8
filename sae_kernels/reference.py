"""The PyTorch path: the reference semantics of every op, and what CPU users run.

Two things live here:

* the four sparse primitives that the autograd Functions in ``ops.py`` are built from, with the same
  signatures as the Triton launchers in ``triton_ops.py`` (``encode_select``, ``gather_rows``,
  ``gather_dot``, ``scatter_outer``). They never build an ``N x k x d_model`` tensor and never scatter
  the top-k values back into a dense ``N x d_sae`` matrix: decoding is an ``embedding_bag``, the
  per-latent reductions are an ``embedding_bag`` over a latent-major CSR map, the per-entry dot
  products a ``sampled_addmm`` on the selection's sparsity pattern.
* ``dense_topk_sae``: the textbook dense TopK SAE (linear, ReLU, weighted top-k, scatter, matmul) with
  plain autograd. Tests evaluate it in float64 as the ground truth and benchmarks use it as the
  dense baseline.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import threading
import warnings

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def topk_indices(score: Tensor, k: int, exact: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """``[N, k]`` indices of each row's ``k`` largest scores, equal scores to the smaller index and
    NaN above every number: the package's selection rule (the Triton kernels' too), which
    ``torch.topk`` alone does not fix for ties. One ``torch.topk`` of ``k + 1``, sorted: a row's
    selection is ambiguous exactly when its ``k + 1``-th score equals its k-th (a tie across the
    boundary; zeros tie in rows with fewer than ``k`` positive scores) or is NaN; only those rows are
    re-selected, by a stable sort. Not in increasing index order.

    ``exact``: when ``score`` stands in for the real scores only where they are positive (the scores
    before the ReLU, as ``encode_select`` ranks them), ``exact(rows)`` returns the real scores of those
    rows; rows whose k-th score is not positive, or whose selection holds a NaN, are then re-selected
    from them too."""
    n = score.shape[1]
    if score.shape[0] == 0 or k >= n:
        if exact is not None and score.shape[0]:
            score = exact(torch.arange(score.shape[0], device=score.device))
        return torch.topk(score, k, dim=1, sorted=False).indices
    vals, idx = torch.topk(score, k + 1, dim=1, sorted=True)
    kth, nxt = vals[:, k - 1], vals[:, k]
    redo = (kth == nxt) | nxt.isnan()
    if exact is not None:
        redo |= (kth <= 0) | vals[:, :k].isnan().any(1)
    rows = redo.nonzero().squeeze(1)
    idx = idx[:, :k].contiguous()  # contiguous: views of it keep latent_csr's cache key
    if rows.numel():
        s = score[rows] if exact is None else exact(rows)
        idx[rows] = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return idx


def _sq_diff(pred: Tensor, target: Tensor, offset: Optional[Tensor]) -> Tensor:
    acc = _acc_dtype(pred.dtype)
    diff = pred.to(acc) - target.to(acc)
    return diff if offset is None else diff.add_(offset.to(acc))


def row_sq_error(pred: Tensor, target: Tensor, offset: Optional[Tensor] = None) -> Tensor:
    """``sum_j (pred + offset - target)[t, j]^2`` per row -> ``[N]`` (fp32; fp64 for fp64 inputs);
    ``target`` may be one row, broadcast."""
    diff = _sq_diff(pred, target, offset)
    return torch.linalg.vecdot(diff, diff)


def row_sq_error_grad(pred: Tensor, target: Tensor, offset: Optional[Tensor], g: Tensor) -> Tensor:
    """``2 (pred + offset - target) * g[:, None]`` in ``pred.dtype``: the gradient of ``pred`` for
    ``row_sq_error``'s sums weighted by ``g``."""
    diff = _sq_diff(pred, target, offset)
    return diff.mul_(2 * g.to(diff.dtype)[:, None]).to(pred.dtype)


def mm_out(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``a @ b`` with fp32 accumulation, written in ``out_dtype`` (cuBLAS writes fp32 from bf16 directly;
    elsewhere the operands are upcast)."""
    if out_dtype == a.dtype:
        return a @ b
    if a.device.type == "cuda" and out_dtype == torch.float32:
        try:
            return torch.mm(a, b, out_dtype=out_dtype)
        except (RuntimeError, TypeError):  # older torch: no mm.dtype
            pass
    return (a.float() @ b.float()).to(out_dtype)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# CPU only: encode_select's N x d_sae buffers (pre-activations, weighted scores) are kept per thread and
# reused by the next call of the same or a smaller size. Fresh ones cost their page faults on every
# step: at 4096 tokens x d_sae 4608 (2 x 75 MiB) reusing them took encode_select from 557 to 413 ms
# (best of 8 runs, 2 busy cores). On CUDA the caching allocator already does this. release_scratch()
# frees them.
_scratch = threading.local()


def _scratch_buffer(slot: str, rows: int, cols: int, like: Tensor) -> Tensor:
    if like.device.type != "cpu":
        return torch.empty(rows, cols, dtype=like.dtype, device=like.device)
    bufs = _scratch.__dict__.setdefault("bufs", {})
    buf = bufs.get(slot)
    if buf is None or buf.dtype != like.dtype or buf.numel() < rows * cols:
        bufs[slot] = None  # free the old buffer before allocating its replacement
        buf = bufs[slot] = torch.empty(rows * cols, dtype=like.dtype)
    return buf[: rows * cols].view(rows, cols)


def _kept_pre_buffer(rows: int, cols: int, like: Tensor) -> Tensor:
    """A buffer of its own for kept pre-activations: the one ``recycle_pre`` handed back on this thread
    when it fits (a fresh ``N x d_sae`` allocation costs its page faults on every step), else a new one."""
    pool = _scratch.__dict__.pop("kept_pre", None)
    if pool is not None and like.device.type == "cpu" and pool.dtype == like.dtype and pool.numel() >= rows * cols:
        return pool.reshape(-1)[: rows * cols].view(rows, cols)
    return torch.empty(rows, cols, dtype=like.dtype, device=like.device)


def recycle_pre(pre: Tensor) -> None:
    """Hand back pre-activations that ``encode_select(..., return_pre=True)`` returned, once nothing reads
    them any more (the caller's promise: the next such encode on this thread writes into them)."""
    if pre.device.type == "cpu" and pre.is_contiguous():
        base = pre if pre._base is None else pre._base
        _scratch.kept_pre = base


def _score(z: Tensor, dec_norm: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """The weighted score ``z * dec_norm`` in the accumulation dtype (fp32 for half z), as the kernels
    rank: a bf16 value times an fp32 norm is not rounded back to bf16 before the comparison."""
    acc = _acc_dtype(z.dtype)
    if z.dtype == acc:
        return torch.mul(z, dec_norm.to(acc), out=out)
    return torch.mul(z.to(acc), dec_norm.to(acc), out=out)


@torch.no_grad()  # writes into scratch buffers (out=); the autograd lives in ops.py
def encode_select(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, dec_norm: Optional[Tensor], *, return_pre: bool = False
):
    """Per row, the k latents with the largest ``relu(x @ W_enc.T + b_enc) * dec_norm``.

    Returns the kept values ``relu(pre)`` (not the weighted scores) and int64 indices, both ``[N, k]``.
    The ``N x d_sae`` pre-activations (and, with ``dec_norm``, the scores) are the one unavoidable
    dense intermediate of this path; on CPU they live in per-thread scratch buffers.
    ``return_pre``: also return the pre-activations (before the ReLU, in a buffer of their own, as
    the Triton path keeps them) for ``select_from_pre``.

    With norms >= 0 (decoder norms always are) the top-k runs on ``pre * dec_norm`` without a ReLU
    pass: where the k-th score is positive the top k of ``relu(pre) * dec_norm`` are the same latents,
    and the other rows (fewer than k positive scores, NaN) are re-selected from the real scores
    (``topk_indices``).

    NaN (the package's one semantics, shared with the Triton path): a latent whose pre-activation or
    score is NaN ranks above every number and keeps the value NaN, so a NaN input row gives k NaN
    values at distinct, in-range latents; -inf or negative scores rank below every other number.
    """
    N, n = x.shape[0], W_enc.shape[0]
    buf = _kept_pre_buffer(N, n, x) if return_pre else _scratch_buffer("pre", N, n, x)
    pre = torch.addmm(b_enc, x, W_enc.t(), out=buf)
    scratch = lambda: _scratch_buffer("score", N, n, pre.new_empty((), dtype=_acc_dtype(pre.dtype)))  # noqa: E731

    def exact(rows: Tensor) -> Tensor:
        z = pre.index_select(0, rows).relu_()
        return z if dec_norm is None else _score(z, dec_norm)

    if dec_norm is None:
        score = pre
    elif bool(dec_norm.min() >= 0):  # one host read of d_sae norms (NaN norms fail it too)
        score = _score(pre, dec_norm, scratch())
    else:  # negative norms: relu(pre) * norm is not relu(pre * norm)
        score = _score(pre.relu(), dec_norm, scratch())
        exact = None
    indices = topk_indices(score, k, exact)
    values = pre.gather(1, indices).relu_()
    return (values, indices, pre) if return_pre else (values, indices)


@torch.no_grad()
def select_from_pre(pre: Tensor, k: int, dec_norm: Optional[Tensor], allowed: Optional[Tensor] = None
                    ) -> Tuple[Tensor, Tensor]:
    """A second top-k over the pre-activations ``encode_select(..., return_pre=True)`` kept, without
    another GEMM: ReLU, then latents where ``allowed`` (bool ``[n]``) is False count as zero."""
    z = pre.relu()
    if allowed is not None:  # a NaN stays NaN (NaN x 0), as the Triton path's -1e30 bias keeps it
        z = z * allowed.to(z.dtype)
    score = z if dec_norm is None else _score(z, dec_norm)
    indices = topk_indices(score, k)
    return z.gather(1, indices), indices


def gather_rows(values: Tensor, indices: Tensor, W: Tensor, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``out[t] = sum_j values[t, j] * W[indices[t, j]]`` with fp32 accumulation, in ``out_dtype``
    (default ``W.dtype``)."""
    acc = _acc_dtype(W.dtype)
    # detach: with requires_grad set on either, embedding_bag also builds its own backward's bookkeeping.
    out = F.embedding_bag(
        indices, W.detach().to(acc), per_sample_weights=values.detach().to(acc), mode="sum"
    )
    return out.to(out_dtype or W.dtype)


def gather_dot(grad_out: Tensor, indices: Tensor, W: Tensor) -> Tensor:
    """``out[t, j] = <grad_out[t], W[indices[t, j]]>``, in ``grad_out.dtype``.

    ``grad_out @ W.T`` sampled at the ``N x k`` selected entries only (``torch.sparse.sampled_addmm`` on
    a CSR pattern with k entries per row): one dot product per entry, no gathered ``N x k x d`` rows.
    """
    N, k = indices.shape
    acc = _acc_dtype(grad_out.dtype)
    crow = torch.arange(0, N * k + 1, k, dtype=torch.int64, device=indices.device)
    # beta=0 still multiplies the pattern's values (NaN * 0 = NaN): they must be zeros, not empty.
    pattern = torch.sparse_csr_tensor(
        crow, indices.reshape(-1), torch.zeros(N * k, dtype=acc, device=indices.device),
        size=(N, W.shape[0]), check_invariants=False,
    )
    out = torch.sparse.sampled_addmm(pattern, grad_out.to(acc), W.to(acc).t(), beta=0.0)
    return out.values().view(N, k).to(grad_out.dtype)


# The last latent_csr result per thread, returned again for the same unmodified indices: both backward
# reductions of a step (decoder dW_dec, then encoder dW_enc and db) use one map. Holds a strong
# reference to those indices, so a data_ptr match cannot be a new tensor reusing freed memory, and
# views share the version counter, so an in-place write since is seen.
_csr_cache = threading.local()


def release_scratch() -> None:
    """Free this thread's cached buffers: ``encode_select``'s CPU scratch and the last ``latent_csr``."""
    _scratch.__dict__.pop("bufs", None)
    _scratch.__dict__.pop("kept_pre", None)
    _csr_cache.__dict__.pop("entry", None)


# latent_csr on the CPU sorts 16-bit keys (id + 1) with NumPy's radix sort up to this many latents.
_NP_RADIX_MAX_ROWS = 65534


def latent_csr(indices: Tensor, n_rows: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Reverse map from latents to their (token, slot) entries, in CSR form, built deterministically.

    Returns ``(crow [n_rows + 1], order [N*k], token [N*k])``: the entries of latent ``i`` are
    ``order[crow[i]:crow[i+1]]`` (positions in the flattened ``[N, k]`` arrays), sorted by position.
    """
    key = None
    if not indices.is_inference():  # inference tensors have no version counter: never cached
        key = (indices.data_ptr(), indices.shape, indices.stride(), indices.dtype, indices.device,
               indices._version, n_rows)
        cached = getattr(_csr_cache, "entry", None)
        if cached is not None and cached[1] == key:
            return cached[2]
    flat = indices.reshape(-1)
    if flat.device.type == "cpu" and n_rows <= _NP_RADIX_MAX_ROWS and flat.numel() > 0:
        # NumPy's stable sort of 16-bit keys is a single-threaded radix sort: 0.9 ms at N*k = 204800,
        # against ~13 ms for torch's single-threaded stable sort (below) on an idle core and ~50 ms on
        # a busy one. Keys are id + 1 clamped to [0, 65535], so that ids out of range stay out of every
        # latent's entries as in the sort below (negative ones first, those >= n_rows last).
        keys16 = (flat.clamp(-1, _NP_RADIX_MAX_ROWS) + 1).numpy().astype(np.uint16)
        order = torch.from_numpy(np.argsort(keys16, kind="stable"))
        # crow[i] = entries with key <= i: the out-of-range negative ones and the ids below i
        crow = torch.from_numpy(np.cumsum(np.bincount(keys16, minlength=n_rows + 1)[:n_rows + 1]))
    else:
        # Sorted as one row of a 2-D tensor: a single-threaded stable sort (~13 ms on one core at N*k =
        # 204800) rather than the parallel radix sort used for 1-D integer tensors (~3 ms on idle cores),
        # whose thread barriers cost 100-190 ms as soon as other processes compete for the cores.
        keys, order = torch.sort(flat.view(1, -1), dim=1, stable=True)
        order = order.view(-1)
        # Row starts by binary search in the sorted keys (bincount would sync with the host on CUDA).
        crow = torch.searchsorted(keys.view(-1), torch.arange(n_rows + 1, dtype=flat.dtype, device=flat.device))
    token = torch.div(order, indices.shape[1], rounding_mode="floor")
    if key is not None:
        _csr_cache.entry = (indices, key, (crow, order, token))
    return crow, order, token


def scatter_outer(
    values: Tensor, indices: Tensor, Y: Tensor, n_rows: int, with_sum: bool,
    out_dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """``dW[i] = sum_{(t, j): indices[t, j] = i} values[t, j] * Y[t]`` (and the sums of values).

    Per latent, the weighted sum of the ``Y`` rows of its entries, in position order: an ``embedding_bag``
    over the latent-major CSR (bags = latents, table = ``Y``). Deterministic, fp32 accumulation, and the
    ``N x k x d`` outer products are never formed. Results in ``out_dtype`` (default: ``Y.dtype`` for
    dW, ``values.dtype`` for the sums), e.g. fp32 gradients of fp32 masters from a bf16 step.
    """
    acc = _acc_dtype(Y.dtype)
    crow, order, token = latent_csr(indices, n_rows)
    vals = values.reshape(-1).take(order).to(acc)
    dW = F.embedding_bag(
        token, Y.to(acc), crow, per_sample_weights=vals, mode="sum", include_last_offset=True
    ).to(out_dtype or Y.dtype)
    dsum = None
    if with_sum:
        dsum = torch.segment_reduce(vals, "sum", offsets=crow, axis=0) if vals.numel() else torch.zeros(
            n_rows, dtype=acc, device=values.device
        )
        dsum = dsum.to(out_dtype or values.dtype)
    return dW, dsum


# --------------------------------------------------------------------------------------------------
# The dense textbook SAE: ground truth for tests (in float64) and the dense baseline for benchmarks.
# --------------------------------------------------------------------------------------------------


ARCHITECTURES = ("topk", "batchtopk", "matryoshka_batchtopk", "standard")


def batch_topk_mask(score: Tensor, k: int) -> Tensor:
    """BatchTopK's selection (docs/method.md sec. 11): over the whole ``[N, n]`` batch, the ``k * N``
    largest scores; equal scores to the smaller (token position, latent id), i.e. the smaller
    row-major index of the batch; NaN above every number. Returns a bool ``[N, n]`` mask with
    ``min(k * N, N * n)`` entries set: the per-token L0 varies, its mean is k."""
    if k < 0:
        raise ValueError(f"k: expected k >= 0, got {k}")
    N, n = score.shape
    keep = min(k * N, N * n)
    flat = score.reshape(-1)
    # a stable descending sort keeps equal scores in index order, and sorts NaN first
    order = torch.sort(flat, descending=True, stable=True).indices[:keep]
    mask = torch.zeros(N * n, dtype=torch.bool, device=score.device)
    mask[order] = True
    return mask.view(N, n)


def batch_topk_threshold(score: Tensor, mask: Tensor) -> Tensor:
    """The step's selection threshold: the smallest kept score (the ``k * N``-th largest of the batch),
    in score units ``relu(pre) * n_i`` = Llama Scope's folded units (sec. 5); 0-d, NaN if none kept."""
    kept = score[mask]
    return kept.min() if kept.numel() else score.new_full((), float("nan"))


def matryoshka_prefixes(widths, d_sae: int) -> Tuple[int, ...]:
    """The nested prefix widths of a Matryoshka member, checked: increasing, ending at d_sae."""
    w = tuple(int(v) for v in widths)
    if not w or w[-1] != d_sae or any(a >= b for a, b in zip(w, w[1:])) or w[0] < 1:
        raise ValueError(f"--matryoshka-widths: expected increasing widths ending at d_sae {d_sae}, got {list(w)}")
    return w


def matryoshka_decode(f: Tensor, W_dec: Tensor, b_dec: Tensor, prefixes) -> List[Tensor]:
    """One reconstruction per prefix: ``x_hat_m = f[:, :m] @ W_dec[:m] + b_dec`` (each prefix decodes
    only its own latents, from b_dec); the last is the member's reconstruction."""
    return [f[:, :m] @ W_dec[:m] + b_dec for m in matryoshka_prefixes(prefixes, W_dec.shape[0])]


def l1_coefficient_at(step: int, l1: float, warmup_steps: int) -> float:
    """The ``standard`` member's L1 coefficient at ``step``: linear from 0 to ``l1`` over the first
    ``warmup_steps`` steps (``l1 * min(1, (step + 1) / warmup_steps)``), then ``l1``."""
    if warmup_steps <= 0:
        return float(l1)
    return float(l1) * min(1.0, (step + 1) / warmup_steps)


def variant_loss(x_hats: List[Tensor], y: Tensor, mean: Tensor, *, loss: str = "llama_scope",
                 f: Optional[Tensor] = None, dec_norm: Optional[Tensor] = None, l1: float = 0.0) -> Tensor:
    """A member's loss from its reconstructions (docs/method.md sec. 11), plain autograd, any dtype.

    Per token ``t`` the objective is ``e_t = mean over the reconstructions r of ||x_hat_r,t - y_t||^2``
    (one reconstruction for ``topk``/``batchtopk``/``standard``; one per prefix, weighted uniformly, for
    Matryoshka) ``+ l1 * sum_i f_ti n_i`` (``standard``). The Llama Scope loss divides ``e_t`` by
    ``d ||y_t - mean||`` and averages over tokens (sec. 2); the FVU divides ``sum_t e_t`` by
    ``sum_t ||y_t - mean||^2``. With one reconstruction and no L1 this is the trainer's loss."""
    err = torch.stack([(xh - y).pow(2).sum(1) for xh in x_hats]).mean(0)
    if l1:
        if f is None or dec_norm is None:
            raise ValueError("variant_loss: l1 needs f and dec_norm")
        err = err + l1 * (f * dec_norm).sum(1)
    var = (y - mean).pow(2).sum(1)
    if loss == "llama_scope":
        return (err / var.sqrt().clamp_min(1e-8)).sum() / (y.shape[0] * y.shape[1])
    if loss == "fvu":
        return err.sum() / var.sum().clamp_min(1e-12)
    raise ValueError(f"loss: expected 'llama_scope' or 'fvu', got {loss!r}")


def dense_variant_sae(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, architecture: str,
                      k: Optional[int] = None, prefixes=None, mask: Optional[Tensor] = None,
                      weighted: bool = True) -> Tuple[List[Tensor], Tensor, Tensor]:
    """Dense forward of every architecture with plain autograd (the float64 reference of sec. 11):
    ``(x_hats, f, mask)``. ``x_hats``: the reconstructions the loss averages (one, or one per
    Matryoshka prefix); ``f [N, d_sae]`` the coefficients (``relu(pre)`` where selected); ``mask`` the
    selection (``standard``: every latent). ``mask`` given fixes the selection (gradients of another
    implementation on exactly the same support)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"--architecture: expected one of {', '.join(ARCHITECTURES)}, got {architecture!r}")
    pre = x @ W_enc.t() + b_enc
    z = torch.relu(pre)
    if mask is None:
        if architecture == "standard":
            mask = torch.ones_like(z, dtype=torch.bool)
        else:
            if k is None:
                raise ValueError(f"--k: the {architecture} architecture needs k")
            score = (z * W_dec.detach().norm(dim=1) if weighted else z).detach()
            if architecture == "topk":
                mask = torch.zeros_like(z, dtype=torch.bool).scatter(1, topk_indices(score, min(k, z.shape[1])), True)
            else:
                mask = batch_topk_mask(score, k)
    f = z * mask.to(z.dtype)
    if architecture == "matryoshka_batchtopk":
        return matryoshka_decode(f, W_dec, b_dec, prefixes if prefixes is not None else [W_dec.shape[0]]), f, mask
    return [f @ W_dec + b_dec], f, mask


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
