"""The public functional ops: ``topk_encode`` and ``sparse_decode``, with autograd.

The autograd Functions only save tensors and call the four primitives of the chosen backend
(``backend.get_impl``): the math lives in the kernels and in ``reference.py``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._validate import check_finite, check_k, check_tensor
from .backend import get_impl

Tensor = torch.Tensor


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, dec_norm):
        impl = get_impl(x.device, W_enc.dtype)
        values, indices = impl.encode_select(x, W_enc, b_enc, k, dec_norm)
        ctx.save_for_backward(x, W_enc, values, indices)
        ctx.impl = impl
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices):
        x, W_enc, values, indices = ctx.saved_tensors
        impl = ctx.impl
        # ReLU: only selected latents with a positive pre-activation pass gradient.
        g = torch.where(values > 0, grad_values, torch.zeros_like(grad_values)).to(W_enc.dtype)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dW = db = None
        if need_x:
            dx = impl.gather_rows(g, indices, W_enc).to(x.dtype)
        if need_w or need_b:
            dW, db = impl.scatter_outer(g, indices, x.to(W_enc.dtype), W_enc.shape[0], with_sum=need_b)
            dW = dW if need_w else None
        return dx, dW, db, None, None


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, W_dec, b_dec):
        impl = get_impl(values.device, W_dec.dtype)
        out = impl.gather_rows(values.to(W_dec.dtype), indices, W_dec)
        if b_dec is not None:
            out = out + b_dec
        ctx.save_for_backward(values, indices, W_dec)
        ctx.impl = impl
        ctx.has_bias = b_dec is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, W_dec = ctx.saved_tensors
        impl = ctx.impl
        grad_out = grad_out.contiguous()
        dvalues = dW = db = None
        if ctx.needs_input_grad[0]:
            dvalues = impl.gather_dot(grad_out, indices, W_dec).to(values.dtype)
        if ctx.needs_input_grad[2]:
            dW, _ = impl.scatter_outer(values.to(W_dec.dtype), indices, grad_out.to(W_dec.dtype), W_dec.shape[0], False)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = grad_out.sum(0, dtype=torch.float32 if grad_out.dtype != torch.float64 else torch.float64)
            db = db.to(grad_out.dtype)
        return dvalues, None, dW, db


def _flatten(name: str, t: Tensor, d: int) -> Tensor:
    check_tensor(name, t)
    if t.dim() < 1 or t.shape[-1] != d:
        raise ValueError(f"{name}: expected shape [..., {d}], got {list(t.shape)}")
    return t.reshape(-1, d)


def topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    dec_norm: Optional[Tensor] = None,
    *,
    check_finite_input: bool = True,
) -> Tuple[Tensor, Tensor]:
    """Decoder-norm-weighted TopK encoding.

    Args:
        x: ``[..., d_model]`` inputs (already normalised if the SAE uses dataset-wise norms).
        W_enc: ``[d_sae, d_model]`` encoder, latent-major.
        b_enc: ``[d_sae]`` encoder bias.
        k: latents kept per row, ``1 <= k <= d_sae``.
        dec_norm: ``[d_sae]`` decoder row norms weighting the selection, or None for plain TopK.
            Treated as a constant: no gradient flows into it.
        check_finite_input: reject NaN/Inf in ``x`` with a ValueError. Costs one host sync: training
            loops that validated their data pass False.

    Returns:
        ``(values, indices)``, both ``[..., k]``: ``relu(x @ W_enc.T + b_enc)`` at the k latents with
        the largest ``relu(pre) * dec_norm`` per row (any order within a row), and int64 indices.
        Differentiable w.r.t. ``x``, ``W_enc`` and ``b_enc``; only the selected latents get gradient.
    """
    check_tensor("W_enc", W_enc, ndim=2)
    n, d = W_enc.shape
    lead = x.shape[:-1] if isinstance(x, torch.Tensor) else None
    x2 = _flatten("x", x, d)
    check_tensor("b_enc", b_enc, shape=(n,), device=W_enc.device)
    if x2.device != W_enc.device:
        raise ValueError(f"x: expected a tensor on {W_enc.device} (where W_enc is), got {x2.device}")
    if x2.dtype != W_enc.dtype:
        raise ValueError(f"x: expected dtype {W_enc.dtype} (the dtype of W_enc), got {x2.dtype}")
    if dec_norm is not None:
        check_tensor("dec_norm", dec_norm, shape=(n,), device=W_enc.device)
        dec_norm = dec_norm.detach()
    k = check_k(k, n)
    if check_finite_input:
        check_finite("x", x2)
    values, indices = _TopKEncode.apply(x2.contiguous(), W_enc, b_enc.to(W_enc.dtype), k, dec_norm)
    return values.reshape(*lead, k), indices.reshape(*lead, k)


def sparse_decode(
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    b_dec: Optional[Tensor] = None,
    *,
    check_indices: bool = True,
) -> Tensor:
    """Sparse decoder: ``x_hat[t] = sum_j values[t, j] * W_dec[indices[t, j]] + b_dec``.

    Args:
        values: ``[..., k]`` latent values. indices: ``[..., k]`` int64 latent ids in ``[0, d_sae)``.
        W_dec: ``[d_sae, d_model]`` decoder, latent-major. b_dec: ``[d_model]`` or None.

    Returns ``[..., d_model]`` in ``W_dec.dtype``; differentiable w.r.t. values, W_dec and b_dec.
    Repeated indices within a row add up. ``check_indices=False`` skips the range check (a host
    sync); pass it only for indices that ``topk_encode`` produced.
    """
    check_tensor("W_dec", W_dec, ndim=2)
    n, d = W_dec.shape
    check_tensor("values", values)
    check_tensor("indices", indices, dtypes=(torch.int64, torch.int32), device=values.device)
    if indices.shape != values.shape or values.dim() < 1:
        raise ValueError(
            f"indices: expected the shape of values {list(values.shape)}, got {list(indices.shape)}"
        )
    if values.device != W_dec.device:
        raise ValueError(f"values: expected a tensor on {W_dec.device} (where W_dec is), got {values.device}")
    if b_dec is not None:
        check_tensor("b_dec", b_dec, shape=(d,), device=W_dec.device)
        b_dec = b_dec.to(W_dec.dtype)
    lead, k = values.shape[:-1], values.shape[-1]
    if k == 0:
        raise ValueError("values: expected at least one latent per row (k >= 1), got k = 0")
    idx2 = indices.reshape(-1, k).long()
    if check_indices and idx2.numel() and (int(idx2.min()) < 0 or int(idx2.max()) >= n):
        raise ValueError(f"indices: expected values in [0, {n}) (d_sae of W_dec), got [{int(idx2.min())}, {int(idx2.max())}]")
    out = _SparseDecode.apply(values.reshape(-1, k).contiguous(), idx2.contiguous(), W_dec, b_dec)
    return out.reshape(*lead, d)


# --------------------------------------------------------------------------------------------------
# A second selection from the same pre-activations (AuxK over dead latents)
# --------------------------------------------------------------------------------------------------


def _encode_select_aux(impl, x, W_enc, b_enc, k, dec_norm, aux_latents):
    """``(values, indices, z_aux [N, m], score_aux [N, m])``: the main selection and, for the ``m``
    latents ``aux_latents``, ``relu(pre)`` and its selection score. The PyTorch path reads the last two
    from the forward's own pre-activations; other backends compute them with one ``N x m x d`` GEMM
    over those rows only."""
    fused = getattr(impl, "encode_select_aux", None)
    if fused is not None:
        return fused(x, W_enc, b_enc, k, dec_norm, aux_latents)
    values, indices = impl.encode_select(x, W_enc, b_enc, k, dec_norm)
    acc = torch.float32 if W_enc.dtype != torch.float64 else torch.float64
    z_aux = torch.addmm(b_enc.index_select(0, aux_latents).to(acc), x.to(acc),
                        W_enc.index_select(0, aux_latents).to(acc).t()).relu_().to(W_enc.dtype)
    score_aux = z_aux if dec_norm is None else z_aux * dec_norm.index_select(0, aux_latents).to(z_aux.dtype)
    return values, indices, z_aux, score_aux


class _TopKEncodeAux(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, dec_norm, aux_latents, k_aux):
        impl = get_impl(x.device, W_enc.dtype)
        values, indices, z_aux, score_aux = _encode_select_aux(impl, x, W_enc, b_enc, k, dec_norm, aux_latents)
        if k_aux < z_aux.shape[1]:  # keep each row's top k_aux of the m latents, zero the rest
            keep = torch.topk(score_aux, k_aux, dim=1, sorted=False).indices
            z_aux = torch.zeros_like(z_aux).scatter_(1, keep, z_aux.gather(1, keep))
        ctx.save_for_backward(x, W_enc, values, indices, z_aux, aux_latents)
        ctx.impl = impl
        ctx.mark_non_differentiable(indices)
        return values, indices, z_aux

    @staticmethod
    def backward(ctx, grad_values, _grad_indices, grad_aux):
        x, W_enc, values, indices, z_aux, aux_latents = ctx.saved_tensors
        impl = ctx.impl
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dW = db = None
        g = torch.where(values > 0, grad_values, torch.zeros_like(grad_values)).to(W_enc.dtype)
        if need_x:
            dx = impl.gather_rows(g, indices, W_enc).to(x.dtype)
        if need_w or need_b:
            dW, db = impl.scatter_outer(g, indices, x.to(W_enc.dtype), W_enc.shape[0], with_sum=need_b)
        if grad_aux is not None:
            # the auxiliary selection is dense over its m latents: three m-column GEMMs
            acc = torch.float32 if W_enc.dtype != torch.float64 else torch.float64
            ga = torch.where(z_aux > 0, grad_aux, torch.zeros_like(grad_aux)).to(acc)
            if need_x:
                dx = dx + (ga @ W_enc.index_select(0, aux_latents).to(acc)).to(x.dtype)
            if need_w:
                dW.index_add_(0, aux_latents, (ga.t() @ x.to(acc)).to(dW.dtype))
            if need_b:
                db.index_add_(0, aux_latents, ga.sum(0).to(db.dtype))
        return dx, (dW if need_w else None), db, None, None, None, None


def topk_encode_aux(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    dec_norm: Optional[Tensor] = None,
    *,
    aux_latents: Tensor,
    k_aux: int,
    check_finite_input: bool = True,
    check_aux_latents: bool = True,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``topk_encode`` plus an auxiliary selection restricted to a subset of latents (AuxK).

    The main selection is exactly ``topk_encode(x, W_enc, b_enc, k, dec_norm)``. The auxiliary one
    keeps, per row, the ``min(k_aux, m)`` latents of ``aux_latents`` with the largest scores (the same
    score, ``relu(pre) * dec_norm``, or ``relu(pre)`` when ``dec_norm`` is None). It is returned dense
    over those ``m`` latents, so that decoding it is one GEMM with their decoder rows:
    ``aux_acts @ W_dec[aux_latents]``. On the PyTorch path the columns come from the forward's own
    ``N x d_sae`` pre-activations; elsewhere from one ``N x m x d`` GEMM over the ``m`` rows.

    Args:
        aux_latents: ``[m]`` int64 latent ids, distinct, ``m >= 1`` (e.g. the dead latents).
        k_aux: auxiliary latents kept per row (``>= 1``; all ``m`` when ``k_aux >= m``).
        check_finite_input: as in ``topk_encode``. check_aux_latents: check that the ids are in range
            (one host sync; pass False for ids the caller built from ``arange(d_sae)``).

    Returns:
        ``(values, indices, aux_acts)``: the first two as ``topk_encode``; ``aux_acts [..., m]`` with
        ``aux_acts[t, j] = relu(pre[t, aux_latents[j]])`` where latent ``aux_latents[j]`` is among row
        ``t``'s auxiliary selection, else 0. Gradients of ``values`` and ``aux_acts`` flow to ``x``,
        ``W_enc`` and ``b_enc`` through the selected latents (positive values) only.
    """
    check_tensor("W_enc", W_enc, ndim=2)
    n, d = W_enc.shape
    x2 = _flatten("x", x, d)
    lead = x.shape[:-1]
    check_tensor("b_enc", b_enc, shape=(n,), device=W_enc.device)
    if x2.device != W_enc.device:
        raise ValueError(f"x: expected a tensor on {W_enc.device} (where W_enc is), got {x2.device}")
    if x2.dtype != W_enc.dtype:
        raise ValueError(f"x: expected dtype {W_enc.dtype} (the dtype of W_enc), got {x2.dtype}")
    if dec_norm is not None:
        check_tensor("dec_norm", dec_norm, shape=(n,), device=W_enc.device)
        dec_norm = dec_norm.detach()
    k = check_k(k, n)
    check_tensor("aux_latents", aux_latents, dtypes=(torch.int64,), device=W_enc.device, ndim=1)
    m = aux_latents.shape[0]
    if m == 0:
        raise ValueError("aux_latents: expected at least one latent id, got none")
    if isinstance(k_aux, bool) or not isinstance(k_aux, int) or k_aux < 1:
        raise ValueError(f"k_aux: expected an int >= 1, got {k_aux!r}")
    if check_finite_input:
        check_finite("x", x2)
    if check_aux_latents:
        if int(aux_latents.min()) < 0 or int(aux_latents.max()) >= n:
            raise ValueError(f"aux_latents: expected ids in [0, {n}), got [{int(aux_latents.min())}, "
                             f"{int(aux_latents.max())}]")
        if int(torch.unique(aux_latents).numel()) != m:
            raise ValueError("aux_latents: expected distinct ids, got repeats")
    v, i, a = _TopKEncodeAux.apply(x2.contiguous(), W_enc, b_enc.to(W_enc.dtype), k, dec_norm,
                                   aux_latents.contiguous(), k_aux)
    return v.reshape(*lead, k), i.reshape(*lead, k), a.reshape(*lead, m)


class _SubsetDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, acts, W, ids):
        W_sub = W.index_select(0, ids)
        ctx.save_for_backward(acts, W_sub, ids)
        ctx.n_rows = W.shape[0]
        return acts @ W_sub

    @staticmethod
    def backward(ctx, grad_out):
        acts, W_sub, ids = ctx.saved_tensors
        d_acts = dW = None
        g = grad_out.to(W_sub.dtype)
        if ctx.needs_input_grad[0]:
            d_acts = (g @ W_sub.t()).to(acts.dtype)
        if ctx.needs_input_grad[1]:
            # index_add_ with distinct ids: index_select's own backward goes through a scatter_add over
            # an expanded index, ~40 ms for 1382 x 576 rows on one CPU core against ~1 ms here
            dW = torch.zeros((ctx.n_rows, W_sub.shape[1]), dtype=W_sub.dtype, device=W_sub.device)
            dW.index_add_(0, ids, acts.to(W_sub.dtype).t() @ g)
        return d_acts, dW, None


def subset_decode(acts: Tensor, W_dec: Tensor, ids: Tensor) -> Tensor:
    """``acts @ W_dec[ids]``: a decode that is dense over the ``m`` latents ``ids`` (the AuxK
    reconstruction from ``topk_encode_aux``'s ``aux_acts``), with gradients to ``acts`` and to the rows
    ``ids`` of ``W_dec``.

    Args:
        acts: ``[N, m]``. W_dec: ``[d_sae, d]``. ids: ``[m]`` int64, distinct (not checked).
    """
    check_tensor("W_dec", W_dec, ndim=2)
    check_tensor("acts", acts, ndim=2)
    if ids.dtype != torch.int64 or ids.ndim != 1 or ids.shape[0] != acts.shape[1]:
        raise ValueError(f"ids: expected an int64 [{acts.shape[1]}] tensor, got {ids.dtype} {list(ids.shape)}")
    return _SubsetDecode.apply(acts, W_dec, ids)
