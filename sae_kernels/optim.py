"""``SAEAdam``: torch's Adam plus what an SAE training step needs folded into the update.

* **Gradient factor.** ``step(grad_scale=t)`` multiplies every gradient by the device scalar ``t``
  inside the update (gradient clipping: ``min(1, c / ||g||)``), instead of a separate pass that reads
  and writes every gradient, and without a host sync.
* **Compute copies.** ``track(param, copy_dtype=torch.bfloat16)`` keeps a copy of ``param`` in a lower
  precision that the step rewrites from the new values: a bf16 forward reads it instead of casting
  the fp32 masters every step.
* **Row norms.** ``track(param, row_norms=True)`` keeps the L2 norms of the rows of a 2-D parameter
  (the decoder row norms that weight the TopK selection), updated by the step.
* **bf16 moments** (``moments_dtype=torch.bfloat16``, off by default): half the optimizer's memory
  traffic, at the cost of moment precision.
* **Row flags.** ``step(row_flags={param: flags})``, ``flags`` uint8 over the parameter's leading index
  (a row of a 2-D weight, an element of a 1-D bias): ``HOLD`` keeps the values (Adam would otherwise
  go on moving a row whose gradient is zero, by its momentum), ``RESET`` restarts the row's Adam: both
  moments start from zero and its bias corrections count the steps since the reset (state
  ``row_step0``, the step count at the row's last reset), so the row steps as a fresh Adam would.
  Zeroed moments alone, corrected with the run's step count ``t``, leave the second moment
  under-corrected by about ``n / t`` after ``n`` steps since the reset, and the row's steps
  ``(1 - beta1**n) sqrt(t / n)`` times a fresh Adam's (2.6x ten steps after a reset at step 150).
  ``HOLD | RESET`` both.

On CUDA (Triton) the update of each parameter is one fused kernel (``csrc_triton/adam.py``) that
reads the parameter, its gradient and both moments once and writes the parameter, the moments, the
copy and the row sums of squares once. Elsewhere (CPU) it is torch's Adam (``foreach``) followed by
the same bookkeeping with torch ops. The state layout and ``state_dict`` are torch.optim.Adam's, so
checkpoints load in either.

Copies and norms are also refreshed whenever a tracked parameter was modified outside the step: an
in-place edit or ``load_state_dict`` (the tensor's version counter moved) or new storage (``p.data = t``,
``.to()``: its address changed; the old storage is kept alive until then, so the address cannot be
reused). In-place writes that bypass the version counter (through ``p.data``, or a NumPy view) cannot
be seen: call ``refresh()`` after them.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional

import torch
from torch import Tensor

from .backend import choose_backend


HOLD, RESET = 1, 2  # row flags (see the module docstring)


class _Tracked:
    __slots__ = ("copy", "norms", "version", "ptr", "storage")

    def __init__(self) -> None:
        self.copy: Optional[Tensor] = None
        self.norms: Optional[Tensor] = None
        self.version = -1
        self.ptr = -1
        # the storage the copies were made from, kept alive: a parameter given new storage (``p.data = t``,
        # a ``.to()`` round trip) can then never land at the old address and pass for unchanged
        self.storage = None


class SAEAdam(torch.optim.Adam):
    """``torch.optim.Adam`` (no weight decay, no amsgrad) with a gradient factor, compute copies, row
    norms and optional bf16 moments (see the module docstring)."""

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 *, moments_dtype: Optional[torch.dtype] = None, foreach: Optional[bool] = None) -> None:
        if moments_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"moments_dtype: expected None, torch.float32 or torch.bfloat16, got {moments_dtype}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, foreach=foreach)
        self.moments_dtype = moments_dtype
        self._tracked: Dict[int, _Tracked] = {}
        self._params: Dict[int, Tensor] = {}

    # ------------------------------------------------------------------ tracked copies and norms

    def track(self, param: Tensor, copy_dtype: Optional[torch.dtype] = None, row_norms: bool = False) -> None:
        """Maintain a ``copy_dtype`` copy of ``param`` and/or the norms of its rows (2-D only)."""
        if not any(param is p for g in self.param_groups for p in g["params"]):
            raise ValueError("track: the parameter is not one this optimizer updates")
        if row_norms and param.dim() != 2:
            raise ValueError(f"track: row_norms needs a 2-D parameter, got shape {list(param.shape)}")
        t = self._tracked.setdefault(id(param), _Tracked())
        self._params[id(param)] = param
        if copy_dtype is not None and copy_dtype != param.dtype:
            t.copy = torch.empty_like(param, dtype=copy_dtype)
        if row_norms:
            t.norms = torch.empty(param.shape[0], dtype=torch.float32, device=param.device)
        t.version = -1  # filled on first use

    def _fresh(self, param: Tensor) -> _Tracked:
        t = self._tracked[id(param)]
        if t.version != param._version or t.ptr != param.data_ptr():
            self._recompute(param, t)
        return t

    @torch.no_grad()
    def _recompute(self, param: Tensor, t: _Tracked) -> None:
        if t.copy is not None:
            t.copy.copy_(param)
        if t.norms is not None:
            torch.linalg.vector_norm(param.float(), dim=1, out=t.norms)
        t.version, t.ptr, t.storage = param._version, param.data_ptr(), param.untyped_storage()

    def compute_copy(self, param: Tensor) -> Tensor:
        """The tracked low-precision copy of ``param`` (``param`` itself when none is kept)."""
        t = self._fresh(param)
        return t.copy if t.copy is not None else param

    def row_norms(self, param: Tensor) -> Tensor:
        """``||param[i]||_2`` of the current values, fp32 ``[rows]``."""
        t = self._fresh(param)
        if t.norms is None:
            raise ValueError("row_norms: the parameter was not tracked with row_norms=True")
        return t.norms

    def refresh(self) -> None:
        """Recompute every copy and norm from the parameters now."""
        for key, t in self._tracked.items():
            self._recompute(self._params[key], t)

    # ------------------------------------------------------------------ the step

    def _use_kernel(self, p: Tensor) -> bool:
        try:
            return (p.dtype == torch.float32 and p.is_contiguous()
                    and choose_backend(p.device, p.dtype) == "triton")
        except ValueError:
            return False

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: Optional[Tensor] = None,
             row_flags: Optional[Dict[Tensor, Tensor]] = None):
        """One Adam step; ``grad_scale``: a scalar tensor multiplying every gradient first;
        ``row_flags``: ``{param: uint8 [param.shape[0]]}`` of ``HOLD`` / ``RESET`` bits."""
        flags = {}
        for p, f in (row_flags or {}).items():
            if f.dtype != torch.uint8 or tuple(f.shape) != (p.shape[0],) or f.device != p.device:
                raise ValueError(f"row_flags: expected uint8 [{p.shape[0]}] on {p.device} for a parameter of shape "
                                 f"{list(p.shape)}, got {f.dtype} {list(f.shape)} on {f.device}")
            flags[id(p)] = f
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        kernel_params = []
        other = []
        for group in self.param_groups:
            if group["weight_decay"] or group["amsgrad"] or group["maximize"]:
                raise ValueError("SAEAdam: weight decay, amsgrad and maximize are not supported")
            for p in group["params"]:
                if p.grad is not None:
                    (kernel_params if self._use_kernel(p) else other).append((group, p))
        if other:
            self._torch_step(other, grad_scale, flags)
        for group, p in kernel_params:
            self._kernel_step(group, p, grad_scale, flags.get(id(p)))
        return loss

    def _state(self, p: Tensor) -> Dict[str, Tensor]:
        st = self.state[p]
        mdt = self.moments_dtype or p.dtype
        if not st:
            st["step"] = torch.tensor(0.0)  # on the CPU, as non-fused torch Adam keeps it: no device sync
            st["exp_avg"] = torch.zeros_like(p, dtype=mdt, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=mdt, memory_format=torch.preserve_format)
        elif st["exp_avg"].dtype != mdt:  # loaded from a checkpoint (torch casts moments to p.dtype)
            st["exp_avg"] = st["exp_avg"].to(mdt)
            st["exp_avg_sq"] = st["exp_avg_sq"].to(mdt)
        return st

    @staticmethod
    def _mark_restarts(p: Tensor, st: Dict[str, Tensor], flags: Tensor) -> None:
        """Record the step count (before this step) of the rows that ``flags`` resets, in
        ``st["row_step0"]`` (fp32, exact up to 2**24 steps; created at the first flags, all zeros:
        0 is 'never reset', whose corrections use the run's step count). No host sync."""
        r = st.get("row_step0")
        if r is None:
            r = st["row_step0"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
        reset = (flags & RESET) != 0
        r.masked_fill_(reset, float(st["step"]))

    @staticmethod
    def _restart_factors(group, st: Dict[str, Tensor], t: float):
        """Per-row ``(lr / (1 - beta1**n), sqrt(1 - beta2**n))``, fp32, with ``n = t - row_step0``
        the steps since a row's last reset (``t`` for rows never reset); None without restarts."""
        r = st.get("row_step0")
        if r is None:
            return None
        beta1, beta2 = group["betas"]
        n = (t - r.double()).clamp_min(1.0)
        return ((group["lr"] / (1 - beta1 ** n)).float(), (1 - beta2 ** n).sqrt().float())

    def _kernel_step(self, group, p: Tensor, grad_scale: Optional[Tensor], flags: Optional[Tensor]) -> None:
        from . import triton_ops

        st = self._state(p)
        beta1, beta2 = group["betas"]
        if flags is not None:
            self._mark_restarts(p, st, flags)
        st["step"] += 1
        t = float(st["step"])  # a CPU tensor: no device sync
        per_row = self._restart_factors(group, st, t)
        t_rec = self._tracked.get(id(p))
        if t_rec is not None and (t_rec.version != p._version or t_rec.ptr != p.data_ptr()):
            self._recompute(p, t_rec)  # modified outside the step: copies must start right
        copy = t_rec.copy if t_rec is not None else None
        sumsq = None
        if t_rec is not None and t_rec.norms is not None:
            sumsq = t_rec.norms  # the kernel writes sums of squares; sqrt in place below
        scale = grad_scale.to(device=p.device, dtype=torch.float32) if grad_scale is not None else None
        grad = p.grad if p.grad.is_contiguous() else p.grad.contiguous()
        triton_ops.adam_step(
            p, grad, st["exp_avg"], st["exp_avg_sq"], beta1=beta1, beta2=beta2, eps=group["eps"],
            step_size=group["lr"] / (1 - beta1 ** t), bc2_sqrt=math.sqrt(1 - beta2 ** t),
            scale=scale, copy=copy, row_sumsq=sumsq, flags=None if flags is None else flags.contiguous(),
            row_step_size=None if per_row is None else per_row[0], row_bc2_sqrt=None if per_row is None else per_row[1],
        )
        if sumsq is not None:
            sumsq.sqrt_()
        # The kernel's writes bump no version counter: bump them as torch's in-place update would
        # (autograd then rejects a graph that saved the old values), then mark the copies current.
        torch.autograd.graph.increment_version(p)
        if copy is not None:
            torch.autograd.graph.increment_version(copy)
        if t_rec is not None:
            t_rec.version, t_rec.ptr = p._version, p.data_ptr()

    def _torch_step(self, grouped, grad_scale: Optional[Tensor], flags: Dict[int, Tensor]) -> None:
        """torch's Adam over ``grouped`` ``[(group, param)]``, with HOLD / RESET and restarted rows."""
        params = [p for _, p in grouped]
        if grad_scale is not None:
            for p in params:
                p.grad.mul_(grad_scale.to(p.grad.dtype))
        held = []  # (param, row ids, their values): written back after torch's step
        restarted = []  # (group, param) with restarted rows: Adam with per-row corrections, below
        for group, p in grouped:
            f = flags.get(id(p))
            st = self.state.get(p)
            if f is not None and st:
                reset = ((f & RESET) != 0).nonzero().squeeze(1)
                if reset.numel():
                    st["exp_avg"].index_fill_(0, reset, 0)
                    st["exp_avg_sq"].index_fill_(0, reset, 0)
                self._mark_restarts(p, st, f)
            if st and "row_step0" in st and bool((st["row_step0"] > 0).any()):
                restarted.append((group, p))
            if f is None:
                continue
            hold = ((f & HOLD) != 0).nonzero().squeeze(1)
            if hold.numel():
                held.append((p, hold, p.detach().index_select(0, hold)))
        low = self.moments_dtype not in (None, torch.float32)
        if low:  # torch's Adam needs moments of the parameter's dtype: widen, step, narrow back
            for p in params:
                st = self._state(p)
                st["exp_avg"], st["exp_avg_sq"] = st["exp_avg"].to(p.dtype), st["exp_avg_sq"].to(p.dtype)
        keep = {id(p) for p in params} - {id(p) for _, p in restarted}
        saved = []
        for group in self.param_groups:  # torch's Adam over just these parameters
            saved.append(group["params"])
            group["params"] = [p for p in group["params"] if id(p) in keep]
        try:
            if keep:
                super().step()
            for group, p in restarted:  # torch's arithmetic, with each row's own bias corrections
                st = self.state[p]
                beta1, beta2 = group["betas"]
                st["step"] += 1
                step_size, bc2_sqrt = (f.view((-1,) + (1,) * (p.dim() - 1))
                                       for f in self._restart_factors(group, st, float(st["step"])))
                m, v, g = st["exp_avg"], st["exp_avg_sq"], p.grad
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = v.sqrt().div_(bc2_sqrt).add_(group["eps"])
                p.detach().addcdiv_(m * step_size, denom, value=-1.0)
        finally:
            for group, ps in zip(self.param_groups, saved):
                group["params"] = ps
            if low:
                for p in params:
                    st = self.state[p]
                    st["exp_avg"] = st["exp_avg"].to(self.moments_dtype)
                    st["exp_avg_sq"] = st["exp_avg_sq"].to(self.moments_dtype)
        for p, ids, values in held:
            p.detach().index_copy_(0, ids, values)
        for p in params:
            t = self._tracked.get(id(p))
            if t is not None:
                self._recompute(p, t)
