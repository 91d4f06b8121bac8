"""The public functional ops, ``topk_encode`` and ``sparse_decode``, with autograd; and the trainer's route.

The autograd Functions only save tensors and call the primitives of the chosen backend
(``backend.get_impl``): the math lives in the kernels and in ``reference.py``.

Two routes reach the same Functions:

* the public ops validate everything a user can get wrong: shapes, dtypes, devices, k, and (one host
  sync each) non-finite inputs (on by default), negative decoder norms and out-of-range indices.
  ``sparse_decode`` range-checks every call, including indices that ``topk_encode`` returned: those
  are in range when returned, but writes through ``.data``, a ``.numpy()`` view or a
  ``torch.from_numpy`` round trip change them without moving their version counter, so nothing
  cheaper proves them unmodified. There is no way to skip the check.
* ``encode_for_training`` / ``decode_for_training``: the trainer's hot loop. No host sync at all:
  inputs may hold NaN (the documented NaN semantics apply and every index stays in range), and
  ``decode_for_training`` accepts only indices an encode produced, unmodified (anything else, as far
  as the version counter tells, is a ValueError; see its docstring for what it cannot tell).
  Both take an optional compute copy of the weights (bf16 copies of fp32 masters, kept current by
  ``sae_kernels.optim.SAEAdam``): the math reads the copy, the gradients are written in the
  masters' dtype directly (no bf16 gradient, no cast of the weights in the step).

NaN semantics (both backends): a latent whose pre-activation or score is NaN ranks above every
number and keeps the value NaN; a NaN input row gives k NaN values at distinct, in-range latents,
and NaN reconstructions. Nothing is silently zeroed.
"""
from __future__ import annotations

import weakref
from typing import Dict, Optional, Tuple

import torch

from ._validate import check_k, check_tensor
from .backend import get_impl
from .reference import mm_out

Tensor = torch.Tensor


# -------------------------------------------------------------------------------- trusted indices
# id(indices) -> (weak reference, version counter at creation, d_sae they were selected from)
_TRUSTED: Dict[int, Tuple["weakref.ref[Tensor]", int, int]] = {}


def _trust(indices: Tensor, n: int) -> None:
    """Remember ``indices`` (just selected out of ``n`` latents) as in range."""
    if indices.is_inference():  # no version counter: cannot tell later writes apart; checked instead
        return
    key = id(indices)

    def _drop(ref, key=key):
        entry = _TRUSTED.get(key)
        if entry is not None and entry[0] is ref:
            _TRUSTED.pop(key, None)

    _TRUSTED[key] = (weakref.ref(indices, _drop), indices._version, n)


def _trusted(indices: Tensor, n: int) -> bool:
    """True for a tensor an encode returned, selected from at most ``n`` latents, whose version counter
    has not moved since. Writes that bypass the counter (``.data``, ``.numpy()`` views, tensors sharing
    the memory through ``torch.from_numpy`` / DLPack) are not seen: only ``decode_for_training``, the
    trainer's internal route, relies on this; the public ``sparse_decode`` range-checks every call."""
    entry = _TRUSTED.get(id(indices))
    return (entry is not None and entry[0]() is indices and not indices.is_inference()
            and entry[1] == indices._version and entry[2] <= n)


def _check_index_range(idx: Tensor, n: int) -> None:
    if idx.numel() and bool(((idx < 0) | (idx >= n)).any()):  # one host sync
        raise ValueError(f"indices: expected values in [0, {n}) (d_sae of W_dec), "
                         f"got [{int(idx.min())}, {int(idx.max())}]")


def _check_encode_inputs(x: Tensor, dec_norm: Optional[Tensor]) -> None:
    """Finite x, finite non-negative dec_norm: one host sync for both."""
    bad = ~torch.isfinite(x).all()
    if dec_norm is not None:
        bad_norm = ~(torch.isfinite(dec_norm) & (dec_norm >= 0)).all()
        bad_x, bad_norm = torch.stack([bad, bad_norm]).tolist()
    else:
        bad_x, bad_norm = bool(bad), False
    if bad_x:
        raise ValueError("x: expected finite values, found NaN or Inf")
    if bad_norm:
        raise ValueError("dec_norm: expected finite values >= 0 (decoder row norms)")


# -------------------------------------------------------------------------------- autograd


def _encode_backward(ctx, grad_values):
    """Gradients of x, W_enc, b_enc through the selected values (shared by both encode Functions)."""
    x, W_c, values, indices = ctx.saved_tensors
    impl = ctx.impl
    # ReLU: only selected latents with a positive pre-activation pass gradient.
    g = torch.where(values > 0, grad_values, torch.zeros_like(grad_values)).to(W_c.dtype)
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx = dW = db = None
    if need_x:
        dx = impl.gather_rows(g, indices, W_c).to(x.dtype)
    if need_w or need_b:
        dW, db = impl.scatter_outer(g, indices, x.to(W_c.dtype), W_c.shape[0], with_sum=need_b,
                                    out_dtype=ctx.w_dtype)
        dW = dW if need_w else None
        db = db.to(ctx.b_dtype) if need_b else None
    return dx, dW, db


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, dec_norm, W_c, b_c, keep):
        # W_enc / b_enc receive the gradients; W_c / b_c (the same tensors, or compute copies) are read.
        # keep: None, or a dict that receives the pre-activations (for EncodeScores, not for backward).
        impl = get_impl(x.device, W_c.dtype)
        out = impl.encode_select(x, W_c, b_c, k, dec_norm, return_pre=keep is not None)
        values, indices = out[0], out[1]
        if keep is not None:
            keep["pre"] = out[2]
        ctx.save_for_backward(x, W_c, values, indices)
        ctx.impl, ctx.w_dtype, ctx.b_dtype = impl, W_enc.dtype, b_enc.dtype
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices):
        dx, dW, db = _encode_backward(ctx, grad_values)
        return dx, dW, db, None, None, None, None, None


class _SelectFromPre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, pre, dec_norm, allowed, W_c):
        impl = get_impl(x.device, W_c.dtype)
        values, indices = impl.select_from_pre(pre, k, dec_norm, allowed)
        ctx.save_for_backward(x, W_c, values, indices)
        ctx.impl, ctx.w_dtype, ctx.b_dtype = impl, W_enc.dtype, b_enc.dtype
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices):
        dx, dW, db = _encode_backward(ctx, grad_values)
        return dx, dW, db, None, None, None, None, None


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, W_dec, b_dec, W_c, out_dtype=None):
        # W_dec / b_dec receive the gradients; W_c (W_dec or its compute copy) is read. out_dtype: the
        # output's dtype (default W_c's; the trainer asks fp32 from a bf16 copy: no rounding of the sum).
        impl = get_impl(values.device, W_c.dtype)
        out_dtype = out_dtype or W_c.dtype
        out = impl.gather_rows(values.to(W_c.dtype), indices, W_c, out_dtype)
        if b_dec is not None:
            out = out + b_dec.to(out_dtype)
        ctx.save_for_backward(values, indices, W_c)
        ctx.impl, ctx.w_dtype = impl, W_dec.dtype
        ctx.b_dtype = b_dec.dtype if b_dec is not None else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, W_c = ctx.saved_tensors
        impl = ctx.impl
        grad_out = grad_out.contiguous()
        dvalues = dW = db = None
        if ctx.needs_input_grad[0]:
            dvalues = impl.gather_dot(grad_out, indices, W_c).to(values.dtype)
        if ctx.needs_input_grad[2]:
            dW, _ = impl.scatter_outer(values.to(W_c.dtype), indices, grad_out.to(W_c.dtype), W_c.shape[0],
                                       False, out_dtype=ctx.w_dtype)
        if ctx.b_dtype is not None and ctx.needs_input_grad[3]:
            acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
            db = grad_out.sum(0, dtype=acc).to(ctx.b_dtype)
        return dvalues, None, dW, db, None, None


# -------------------------------------------------------------------------------- public ops


def _flatten(name: str, t: Tensor, d: int) -> Tensor:
    check_tensor(name, t)
    if t.dim() < 1 or t.shape[-1] != d:
        raise ValueError(f"{name}: expected shape [..., {d}], got {list(t.shape)}")
    return t.reshape(-1, d)


def _encode_args(x, W_enc, b_enc, k, dec_norm):
    """Host-side checks shared by both routes; returns (x [N, d], lead dims, b_enc, k, dec_norm)."""
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
    return x2, lead, b_enc, check_k(k, n), dec_norm


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
        check_finite_input: reject NaN/Inf in ``x``, and NaN/Inf or negative ``dec_norm``, with a
            ValueError (one host sync). With False, NaN follows the package's NaN semantics (a NaN
            pre-activation ranks first and keeps the value NaN) and every index is still in range.

    Returns:
        ``(values, indices)``, both ``[..., k]``: ``relu(x @ W_enc.T + b_enc)`` at the k latents with
        the largest ``relu(pre) * dec_norm`` per row (any order within a row), and int64 indices.
        Differentiable w.r.t. ``x``, ``W_enc`` and ``b_enc``; only the selected latents get gradient.
    """
    x2, lead, b_enc, k, dec_norm = _encode_args(x, W_enc, b_enc, k, dec_norm)
    if check_finite_input:
        _check_encode_inputs(x2, dec_norm)
    b = b_enc.to(W_enc.dtype)
    values, indices = _TopKEncode.apply(x2.contiguous(), W_enc, b, k, dec_norm, W_enc, b, None)
    values, indices = values.reshape(*lead, k), indices.reshape(*lead, k)
    _trust(indices, W_enc.shape[0])
    return values, indices


def _decode_args(values, indices, W_dec, b_dec):
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
    k = values.shape[-1]
    if k == 0:
        raise ValueError("values: expected at least one latent per row (k >= 1), got k = 0")
    return n, d, k


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
        check_indices: kept for compatibility; there is no unchecked path. Every call range-checks
            ``indices`` (one host sync) and out-of-range ids raise a ValueError on both backends,
            also for indices that ``topk_encode`` returned: writes through ``.data`` or a NumPy view
            change them without moving the version counter, so their origin proves nothing.

    Returns ``[..., d_model]`` in ``W_dec.dtype``; differentiable w.r.t. values, W_dec and b_dec.
    Repeated indices within a row add up.
    """
    n, d, k = _decode_args(values, indices, W_dec, b_dec)
    lead = values.shape[:-1]
    idx2 = indices.reshape(-1, k).long()
    _check_index_range(idx2, n)  # every call: see check_indices above
    b = b_dec.to(W_dec.dtype) if b_dec is not None else None
    out = _SparseDecode.apply(values.reshape(-1, k).contiguous(), idx2.contiguous(), W_dec, b, W_dec)
    return out.reshape(*lead, d)


def decode_selected(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Optional[Tensor] = None) -> Tensor:
    """``sparse_decode`` of indices the caller selected itself, from ``W_dec``'s rows, and never let out of
    its hands (``TopKSAE.forward``): in range by construction, so no range check and no host sync.
    Shapes, dtypes and devices are checked as ``sparse_decode`` checks them."""
    n, d, k = _decode_args(values, indices, W_dec, b_dec)
    lead = values.shape[:-1]
    b = b_dec.to(W_dec.dtype) if b_dec is not None else None
    out = _SparseDecode.apply(values.reshape(-1, k).contiguous(), indices.reshape(-1, k).long().contiguous(), W_dec, b,
                              W_dec)
    return out.reshape(*lead, d)


# -------------------------------------------------------------------------------- the trainer's route


class _TakeFromPre(torch.autograd.Function):
    """``relu(pre)`` at given ``(row, latent)`` entries, differentiable like the encode (its backward)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, z, indices, W_c):
        values = z.clone()
        ctx.save_for_backward(x, W_c, values, indices)
        ctx.impl, ctx.w_dtype, ctx.b_dtype = get_impl(x.device, W_c.dtype), W_enc.dtype, b_enc.dtype
        return values

    @staticmethod
    def backward(ctx, grad_values):
        dx, dW, db = _encode_backward(ctx, grad_values)
        return dx, dW, db, None, None, None


class EncodeScores:
    """What ``encode_for_training(..., keep_pre=True)`` kept of the forward: its pre-activations,
    so that a second selection (AuxK's top-k_aux among dead latents) needs no second GEMM.
    ``pre`` is None when the encode did not materialise them (fused kernel, or several row slabs);
    ``select`` then runs a masked encode instead. Holds N x d_sae elements until dropped."""

    def __init__(self, x, W_enc, b_enc, dec_norm, W_c, b_c, pre):
        self._args = (x, W_enc, b_enc, dec_norm, W_c, b_c)
        self.pre = pre

    @property
    def dec_norm(self) -> Optional[Tensor]:
        """The decoder row norms the encode weighted its selection by (None: plain TopK)."""
        return self._args[3]

    def select(self, k: int, allowed: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``(values, indices)`` of the top-k of ``relu(pre) * dec_norm`` where latents with
        ``allowed`` False count as zero; differentiable w.r.t. x, W_enc, b_enc like the encode."""
        x, W_enc, b_enc, dec_norm, W_c, b_c = self._args
        n = W_c.shape[0]
        k = check_k(k, n)
        if allowed is not None:
            check_tensor("allowed", allowed, shape=(n,), dtypes=(torch.bool,), device=W_c.device)
        if self.pre is not None:
            values, indices = _SelectFromPre.apply(x, W_enc, b_enc, k, self.pre, dec_norm, allowed, W_c)
        else:
            bias = b_c if allowed is None else b_c + torch.where(allowed, 0.0, -1e30).to(b_c.dtype)
            values, indices = _TopKEncode.apply(x, W_enc, b_enc, k, dec_norm, W_c, bias, None)
        _trust(indices, n)
        return values, indices

    def release(self) -> None:
        """Drop the kept pre-activations; on the CPU the next ``keep_pre`` encode of this thread reuses
        their memory. For a caller that owns this object and holds no view of ``pre`` any more (the
        trainer's step, once its backward has run)."""
        pre, self.pre = self.pre, None
        if pre is not None and pre.device.type == "cpu":
            from .reference import recycle_pre

            recycle_pre(pre)

    def _pre_rows(self, rows: Tensor) -> Tensor:
        x, _, _, _, W_c, b_c = self._args
        if self.pre is not None:
            return self.pre.index_select(0, rows)
        return torch.addmm(b_c, x.index_select(0, rows), W_c.t())  # the encode kept none: one GEMM

    @torch.no_grad()
    def row_scores(self, rows: Tensor) -> Tensor:
        """The selection scores ``relu(pre) * dec_norm`` (fp32; float64 for float64 weights) of every
        latent for the tokens ``rows`` (int64 ``[R]``), detached: ``[R, n]``."""
        pre = self._pre_rows(rows)
        acc = torch.float64 if pre.dtype == torch.float64 else torch.float32
        z = pre.relu().to(acc)
        return z if self.dec_norm is None else z * self.dec_norm.to(acc)

    def take(self, rows: Tensor, indices: Tensor) -> Tuple[Tensor, Tensor]:
        """``(values, indices)`` for the tokens ``rows`` (int64 ``[R]``) at the latents ``indices [R, m]``
        (chosen by the caller from ``row_scores`` or the encode's candidates): ``values = relu(pre)``
        there, differentiable w.r.t. x, W_enc, b_enc like the encode. The indices are range-checked (one
        host sync) and trusted by ``decode_for_training`` from then on."""
        x, W_enc, b_enc, _, W_c, _ = self._args
        n = W_c.shape[0]
        check_tensor("rows", rows, ndim=1, dtypes=(torch.int64,), device=x.device)
        check_tensor("indices", indices, ndim=2, dtypes=(torch.int64,), device=x.device)
        _check_index_range(indices, n)
        x_rows = x.index_select(0, rows)
        with torch.no_grad():
            if self.pre is not None:  # the entries only, not the rows
                z = self.pre.reshape(-1).take(rows[:, None] * n + indices).relu()
            else:  # one dot product per entry (no GEMM over the rows)
                b_c = self._args[5]
                z = (get_impl(x.device, W_c.dtype).gather_dot(x_rows.to(W_c.dtype), indices, W_c)
                     + b_c.index_select(0, indices.reshape(-1)).view_as(indices)).relu()
        values = _TakeFromPre.apply(x_rows, W_enc, b_enc, z, indices, W_c)
        _trust(indices, n)
        return values, indices


def encode_for_training(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    dec_norm: Optional[Tensor] = None,
    *,
    compute: Optional[Tuple[Tensor, Tensor]] = None,
    keep_pre: bool = False,
):
    """``topk_encode`` for a training loop: no host sync, fp32 master gradients.

    ``compute``: ``(W_enc_c, b_enc_c)`` read by the math instead of ``W_enc`` / ``b_enc`` (bf16 copies
    of fp32 masters; x must have their dtype); the gradients still go to ``W_enc`` / ``b_enc``, in
    their dtype. ``keep_pre``: also return an ``EncodeScores`` for a second selection.
    Returns ``(values, indices)`` or ``(values, indices, EncodeScores)``.
    """
    W_c, b_c = compute if compute is not None else (W_enc, b_enc)
    x2, lead, b_c, k, dec_norm = _encode_args(x, W_c, b_c, k, dec_norm)
    if W_enc.shape != W_c.shape or b_enc.shape != b_c.shape:
        raise ValueError(f"compute: expected copies of W_enc {list(W_enc.shape)} and b_enc {list(b_enc.shape)}")
    b_c = b_c.to(W_c.dtype)
    x2 = x2.contiguous()
    holder = {} if keep_pre else None
    values, indices = _TopKEncode.apply(x2, W_enc, b_enc, k, dec_norm, W_c, b_c, holder)
    values, indices = values.reshape(*lead, k), indices.reshape(*lead, k)
    _trust(indices, W_c.shape[0])
    if not keep_pre:
        return values, indices
    return values, indices, EncodeScores(x2, W_enc, b_enc, dec_norm, W_c, b_c, holder.get("pre"))


def decode_for_training(
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    b_dec: Optional[Tensor] = None,
    *,
    compute: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """``sparse_decode`` for a training loop: no host sync. ``indices`` must be a tensor an encode
    returned (``topk_encode``, ``encode_for_training`` or ``EncodeScores.select``), passed on
    unmodified: another tensor, or one modified in place (its version counter moved), is a
    ValueError. Writes that bypass the version counter (``.data``, ``.numpy()`` views, memory shared
    through ``torch.from_numpy``) cannot be seen without a host sync: the caller must not make them
    (an out-of-range id would then be dropped by the Triton kernels, and fail in ``embedding_bag``
    with a RuntimeError on the PyTorch path); ``sparse_decode`` checks every call. ``compute``: the copy of
    ``W_dec`` the math reads (gradients still go to ``W_dec`` in its dtype). ``out_dtype``: the
    reconstruction's dtype (default the compute copy's): fp32 from a bf16 copy keeps the fp32 sum,
    so partial sums of latent shards add up to what one process computes."""
    W_c = compute if compute is not None else W_dec
    n, d, k = _decode_args(values, indices, W_c, b_dec)
    if W_dec.shape != W_c.shape:
        raise ValueError(f"compute: expected a copy of W_dec {list(W_dec.shape)}, got {list(W_c.shape)}")
    if not _trusted(indices, n):
        raise ValueError("indices: decode_for_training takes only indices returned by an encode "
                         "(unmodified); use sparse_decode for indices of other origin")
    lead = values.shape[:-1]
    out = _SparseDecode.apply(values.reshape(-1, k), indices.reshape(-1, k), W_dec, b_dec, W_c, out_dtype)
    return out.reshape(*lead, d)


# ------------------------------------------------------------- losses: row-wise squared error


class _RowSqError(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, offset):
        impl = get_impl(pred.device, pred.dtype)
        ctx.save_for_backward(pred, target, offset)
        ctx.impl = impl
        return impl.row_sq_error(pred, target, offset)

    @staticmethod
    def backward(ctx, g):
        pred, target, offset = ctx.saved_tensors
        return ctx.impl.row_sq_error_grad(pred, target, offset, g), None, None


def row_sq_error(pred: Tensor, target: Tensor, offset: Optional[Tensor] = None) -> Tensor:
    """``sum_j (pred + offset - target)[t, j]^2`` for each row ``t`` -> ``[N]`` fp32 (fp64 for fp64
    inputs), differentiable in ``pred`` only (``target`` and ``offset`` are constants: a batch mean, a
    detached residual). One pass over the operands forward and one backward on the Triton path:
    every reconstruction loss and metric of a training step is built from these row sums.

    Args:
        pred: ``[N, d]``. target: ``[N, d]`` or ``[1, d]`` (broadcast to every row). offset: ``[N, d]`` or None.
    """
    check_tensor("pred", pred, ndim=2)
    check_tensor("target", target, ndim=2, device=pred.device)
    if offset is not None:
        check_tensor("offset", offset, shape=tuple(pred.shape), device=pred.device)
    if target.shape[1] != pred.shape[1] or target.shape[0] not in (1, pred.shape[0]):
        raise ValueError(f"target: expected [{pred.shape[0]}, {pred.shape[1]}] or [1, {pred.shape[1]}], "
                         f"got {list(target.shape)}")
    return _RowSqError.apply(pred, target.detach(), None if offset is None else offset.detach())


# ------------------------------------------------------------- AuxK dense over a subset of latents


def _row_grad_sink(template: Tensor, m: int, dtype: torch.dtype) -> Tensor:
    """An uninitialised ``[m, *template.shape[1:]]`` leaf that requires grad: ``select_dense`` /
    ``subset_decode`` with ``row_grads`` return the gradient of those rows to it (its values are never read)."""
    return torch.empty((m,) + tuple(template.shape[1:]), dtype=dtype, device=template.device).requires_grad_()


class RowGrads:
    """Gradients of the rows ``ids`` of full-size parameters, kept ``[m, ...]`` instead of
    full-size. ``select_dense`` and ``subset_decode`` build full ``[d_sae, d]`` gradients with zeros
    outside ``ids`` by default; given a ``RowGrads`` they return the rows' gradients to its sinks,
    and ``add_to`` adds them to the parameters' ``.grad`` after the backward: work in proportion to
    ``m``, not to d_sae (AuxK over the dead latents next to a full-width main gradient)."""

    def __init__(self, ids: Tensor) -> None:
        self.ids = ids
        self.sinks: "Dict[int, Tuple[Tensor, Tensor]]" = {}

    def sink(self, param: Tensor) -> Tensor:
        """The ``[m, ...]`` leaf that receives ``param``'s row gradients (one per parameter)."""
        key = id(param)
        if key not in self.sinks:
            self.sinks[key] = (param, _row_grad_sink(param, self.ids.numel(), param.dtype))
        return self.sinks[key][1]

    @torch.no_grad()
    def add_to(self) -> None:
        """``param.grad[ids] += rows`` for every sink that received a gradient (``index_add_``: one
        read and one write of the rows)."""
        for param, s in self.sinks.values():
            if s.grad is None:
                continue
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            param.grad.index_add_(0, self.ids, s.grad.to(param.grad.dtype))
        self.sinks.clear()


def _host_sync_free(t: Tensor) -> bool:
    """Whether reading a value of ``t`` on the host costs nothing (the CPU: no device to wait for)."""
    return t.device.type == "cpu"


class _DenseFromPre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, pre, dec_norm, ids, k_aux, W_c, b_c, allowed, sink_w, sink_b):
        if pre is not None:
            z = pre.index_select(1, ids).relu()
        else:  # the encode kept no pre-activations: one GEMM over the m latents
            z = torch.addmm(b_c.index_select(0, ids), x, W_c.index_select(0, ids).t()).relu()
        if allowed is not None:
            z = torch.where(allowed, z, torch.zeros_like(z))
        # keep each row's top k_aux of the m latents, zero the rest: the encode's own exact selection
        # (its backend's row select, with the package's tie and NaN rules) over the [N, m] block. Rows
        # with at most k_aux positive entries keep all of them, so when every row does, the selection
        # is the identity (dead latents are positive on few tokens: ~10-25% of them per token in the
        # default runs) and is skipped on the CPU, where the count's host sync is free; on a GPU the
        # selection always runs (same result, no sync).
        if k_aux < z.shape[1] and (not _host_sync_free(z) or int((z > 0).sum(1).max()) > k_aux):
            norm = dec_norm.index_select(0, ids) if dec_norm is not None else None
            vals, keep = get_impl(z.device, z.dtype).select_from_pre(z.contiguous(), k_aux, norm)
            z = torch.zeros_like(z).scatter_(1, keep, vals.to(z.dtype))
        ctx.save_for_backward(x, W_c, z, ids)
        ctx.w_dtype, ctx.b_dtype = W_enc.dtype, b_enc.dtype
        ctx.rows = sink_w is not None
        return z

    @staticmethod
    def backward(ctx, grad):
        x, W_c, z, ids = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.rows:
            need_w, need_b = ctx.needs_input_grad[10:12]
        # operands in the compute dtype, fp32 accumulation (as the encode's own backward)
        g = torch.where(z > 0, grad, torch.zeros_like(grad)).to(W_c.dtype)
        dx = dW = db = None
        if need_x:
            dx = mm_out(g, W_c.index_select(0, ids), x.dtype)
        if need_w:
            dW = mm_out(g.t(), x.to(W_c.dtype), ctx.w_dtype)
            if not ctx.rows:
                full = torch.zeros(W_c.shape, dtype=ctx.w_dtype, device=W_c.device)
                full[ids] = dW  # distinct ids: a plain row write
                dW = full
        if need_b:
            acc = torch.float64 if g.dtype == torch.float64 else torch.float32
            db = g.sum(0, dtype=acc).to(ctx.b_dtype)
            if not ctx.rows:
                full = torch.zeros(W_c.shape[0], dtype=ctx.b_dtype, device=W_c.device)
                full[ids] = db
                db = full
        if ctx.rows:
            return dx, None, None, None, None, None, None, None, None, None, dW, db
        return dx, dW, db, None, None, None, None, None, None, None, None, None


def select_dense(scores: EncodeScores, ids: Tensor, k_aux: int, *, allowed: Optional[Tensor] = None,
                 row_grads: Optional[RowGrads] = None) -> Tensor:
    """AuxK's selection dense over the ``m`` latents ``ids`` (e.g. the dead ones, or a superset of
    them with ``allowed`` marking the dead): ``[N, m]`` with ``relu(pre[t, ids[j]])`` where latent
    ``ids[j]`` is allowed and among row ``t``'s top-``k_aux`` of the allowed ``ids`` (by
    ``relu(pre) * dec_norm``, as ``EncodeScores.select``), else 0. Its work grows with ``m``, not with
    d_sae; decode it with ``subset_decode``. From the pre-activations the encode kept
    (``encode_for_training(..., keep_pre=True)``), or, where it kept none (fused encode), one GEMM over
    the ``m`` latents. Gradients to ``x``, ``W_enc``, ``b_enc`` like the encode's (to ``row_grads``'
    sinks for ``W_enc`` / ``b_enc`` when given).

    Args:
        ids: ``[m]`` int64, distinct, in range (not checked: the caller builds them from a mask).
        k_aux: latents kept per row (``>= 1``; all ``m`` when ``k_aux >= m``).
        allowed: bool ``[m]``: latents of ``ids`` that may be selected (None: all).
        row_grads: a ``RowGrads`` over the same ``ids``: ``[m, d]`` / ``[m]`` gradients instead of full ones.
    """
    x, W_enc, b_enc, dec_norm, W_c, b_c = scores._args
    if isinstance(k_aux, bool) or not isinstance(k_aux, int) or k_aux < 1:
        raise ValueError(f"k_aux: expected an int >= 1, got {k_aux!r}")
    if ids.dtype != torch.int64 or ids.ndim != 1 or ids.numel() == 0:
        raise ValueError(f"ids: expected a non-empty int64 [m] tensor, got {ids.dtype} {list(ids.shape)}")
    if allowed is not None:
        check_tensor("allowed", allowed, shape=(ids.numel(),), dtypes=(torch.bool,), device=W_c.device)
    sink_w = sink_b = None
    if row_grads is not None:
        if row_grads.ids is not ids:
            raise ValueError("row_grads: expected a RowGrads over the same ids tensor")
        sink_w, sink_b = row_grads.sink(W_enc), row_grads.sink(b_enc)
    return _DenseFromPre.apply(x, W_enc, b_enc, scores.pre, dec_norm, ids, k_aux, W_c, b_c, allowed, sink_w, sink_b)


class _SubsetDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, acts, W_dec, ids, W_c, sink, out_dtype):
        W_sub = W_c.index_select(0, ids)
        ctx.save_for_backward(acts, W_sub, ids)
        ctx.n_rows, ctx.w_dtype = W_c.shape[0], W_dec.dtype
        ctx.rows = sink is not None
        return mm_out(acts, W_sub, out_dtype or W_sub.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        acts, W_sub, ids = ctx.saved_tensors
        d_acts = dW = None
        g = grad_out.to(W_sub.dtype)  # operands in the compute dtype, fp32 accumulation
        if ctx.needs_input_grad[0]:
            d_acts = mm_out(g, W_sub.t(), acts.dtype)
        if ctx.needs_input_grad[4 if ctx.rows else 1]:
            rows = mm_out(acts.to(W_sub.dtype).t(), g, ctx.w_dtype)
            if ctx.rows:
                return d_acts, None, None, None, rows, None
            # distinct ids: a plain row write. index_select's own backward and index_add_ go through a
            # scatter_add over an expanded index: 45-200 ms for 92-1382 rows x 576 on a loaded 2-core
            # CPU, against < 1 ms for this write
            dW = torch.zeros((ctx.n_rows, W_sub.shape[1]), dtype=ctx.w_dtype, device=W_sub.device)
            dW[ids] = rows
        return d_acts, dW, None, None, None, None


def subset_decode(acts: Tensor, W_dec: Tensor, ids: Tensor, *, compute: Optional[Tensor] = None,
                  row_grads: Optional[RowGrads] = None, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``acts @ W_dec[ids]``: a decode dense over the ``m`` latents ``ids`` (what ``select_dense``
    returns), with gradients to ``acts`` and to the rows ``ids`` of ``W_dec`` (full-size, or ``[m, d]``
    to ``row_grads``' sink when given). ``compute``: the copy of ``W_dec`` the math reads (gradients
    still go to ``W_dec`` in its dtype). ``out_dtype``: the output's dtype (default the copy's; fp32
    from a bf16 copy keeps the fp32 sum).

    Args:
        acts: ``[N, m]``. W_dec: ``[d_sae, d]``. ids: ``[m]`` int64, distinct (not checked).
    """
    W_c = compute if compute is not None else W_dec
    check_tensor("W_dec", W_c, ndim=2)
    check_tensor("acts", acts, ndim=2)
    if ids.dtype != torch.int64 or ids.ndim != 1 or ids.shape[0] != acts.shape[1]:
        raise ValueError(f"ids: expected an int64 [{acts.shape[1]}] tensor, got {ids.dtype} {list(ids.shape)}")
    sink = None
    if row_grads is not None:
        if row_grads.ids is not ids:
            raise ValueError("row_grads: expected a RowGrads over the same ids tensor")
        sink = row_grads.sink(W_dec)
    return _SubsetDecode.apply(acts.to(W_c.dtype), W_dec, ids, W_c, sink, out_dtype)
