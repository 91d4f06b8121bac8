"""One training step of an SAE on any layout: Llama Scope's recipe (docs/method.md sec. 2-4, 8).

* ``estimate_norm``: dataset-wise norm ``mu = mean_t ||x_t||``; the SAE trains on ``s * x`` with
  ``s = sqrt(d_model) / mu``, separately for inputs and targets.
* ``llama_scope_loss`` / ``fvu_loss``: the reconstruction losses.
* ``StepConfig`` (what the step needs of ``TrainConfig``), ``make_optimizer`` (``SAEAdam``).
* ``SAEStep``: one optimiser step (weighted TopK encode, sparse decode, loss, optional AuxK, gradient
  clipping, Adam with the dead-latent row flags, schedules, dead-latent counters) with no host sync, over
  the member's ``ParallelContext``: a no-op 1 x 1 mesh in one process, so every layout runs this code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from sae_kernels import TopKSAE
from sae_kernels.ops import RowGrads, row_sq_error
from sae_kernels.optim import HOLD, RESET, SAEAdam

from sae_kernels.reference import ARCHITECTURES, l1_coefficient_at, matryoshka_prefixes

from ..parallel import (
    ParallelContext, ShardedTopK, ShardedTopKSAE, batch_topk_forward, dense_forward, gather_full_state, shard_state,
    sharded_forward, sharded_select_decode,
)
from .schedules import k_schedule, lr_factor


@torch.no_grad()
def estimate_norm(x: Tensor) -> float:
    """``mean_t ||x_t||_2`` in float64 (docs/method.md sec. 3)."""
    if x.shape[0] == 0:
        raise ValueError("estimate_norm: no tokens (every token was special?)")
    return float(x.double().norm(dim=-1).mean())


def llama_scope_loss(x_hat: Tensor, y: Tensor, mean: Optional[Tensor] = None) -> Tensor:
    """Mean over elements of ``(x_hat - y)^2 / ||y_t - mean_batch(y)||_2`` (clamped at 1e-8).
    ``mean``: the batch mean ``[1, d]`` if it is not ``y``'s (data parallelism: the global batch)."""
    mean = y.mean(0, keepdim=True) if mean is None else mean
    den = (y - mean).norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return ((x_hat - y).pow(2) / den).mean()


def fvu_loss(x_hat: Tensor, y: Tensor, mean: Optional[Tensor] = None, reduce=None) -> Tensor:
    """``sum (x_hat - y)^2 / sum (y - mean_batch(y))^2`` (fraction of variance unexplained).
    ``mean`` / ``reduce``: global batch mean and denominator average under data parallelism."""
    mean = y.mean(0, keepdim=True) if mean is None else mean
    den = (y - mean).pow(2).sum()
    den = den if reduce is None else reduce(den)
    return (x_hat - y).pow(2).sum() / den.clamp_min(1e-12)


@dataclass
class StepConfig:
    """What ``SAEStep`` needs of ``TrainConfig`` (resolved)."""

    k: int
    k_start: int
    total_steps: int
    anneal_steps: int
    warmup_steps: int
    decay_fraction: float
    lr: float
    clip_grad_norm: float
    loss: str = "llama_scope"
    auxk: bool = False
    auxk_coef: float = 1 / 32
    k_aux: int = 256
    dead_window_tokens: int = 10_000_000
    compute_dtype: Optional[torch.dtype] = None  # bf16: cast weights and inputs for the SAE math
    # At step 0, before the update: b_dec = b_dec_init x mean of the batch's (normalised) targets and
    # b_enc = -W_enc @ mean of its inputs (``SAEStep.init_from_data``). Off in the released recipe.
    data_init: bool = False
    b_dec_init: float = 1.0
    # Once per dead window, latents dead for two windows whose pre-activation is <= 0 on every token
    # of the batch (out of AuxK's reach) get b_enc = -W_enc @ mean(x_n) (``SAEStep.recentre_unreachable``).
    recentre_dead: bool = False
    # Adam row flags (``SAEStep.row_flags``): latents that just died start AuxK with a restarted Adam, and
    # dead latents move only on the steps where AuxK gives them a gradient (no drift by momentum).
    hold_dead: bool = False
    reset_dead_moments: bool = False
    # AuxK runs over candidate latents: those that can be dead before the candidates are next refreshed,
    # a host sync every ``aux_refresh_steps`` steps (None: every step on the CPU, where a sync is free,
    # every 64 elsewhere). Within them the dead are masked exactly, so the value only moves cost.
    aux_refresh_steps: Optional[int] = None
    # The member's architecture (docs/method.md sec. 11): "topk" (Llama Scope's weighted TopK per token),
    # "batchtopk" (the K x B largest scores of the step's whole batch), "matryoshka_batchtopk" (BatchTopK, the
    # loss the mean over the nested prefixes ``matryoshka_widths`` ending at d_sae) or "standard" (ReLU with
    # an L1 penalty ``l1_coefficient * sum_i f_i ||W_dec[i]||``, linear warmup over ``l1_warmup_steps``).
    architecture: str = "topk"
    l1_coefficient: float = 0.0
    l1_warmup_steps: int = 0
    matryoshka_widths: Optional[Tuple[int, ...]] = None
    # BatchTopK's inference threshold: an EMA of each step's threshold after K-annealing, bias-corrected
    # (0.99, SAELens's: the threshold falls while the SAE trains, and a longer memory lags behind it)
    threshold_decay: float = 0.99

    @classmethod
    def from_train_config(cls, c, compute_dtype: Optional[torch.dtype] = None) -> "StepConfig":
        return cls(
            k=c.k, k_start=c.k_start, total_steps=c.total_steps,
            anneal_steps=int(c.k_anneal_fraction * c.total_steps), warmup_steps=c.warmup_steps,
            decay_fraction=c.decay_fraction, lr=c.lr, clip_grad_norm=c.clip_grad_norm, loss=c.loss,
            auxk=c.auxk and c.architecture != "standard", auxk_coef=c.auxk_coef, k_aux=c.k_aux, dead_window_tokens=c.dead_window_tokens,
            compute_dtype=compute_dtype, data_init=c.data_init, b_dec_init=c.b_dec_init_fraction,
            recentre_dead=c.recentre_dead, hold_dead=c.hold_dead, reset_dead_moments=c.reset_dead_moments,
            architecture=c.architecture, l1_coefficient=c.l1_coefficient or 0.0,
            l1_warmup_steps=int(c.l1_warmup_fraction * c.total_steps),
            matryoshka_widths=(tuple(c.matryoshka_widths) if c.architecture == "matryoshka_batchtopk" else None),
        )


def make_optimizer(sae: TopKSAE, lr: float, betas: Tuple[float, float],
                   moments_dtype: Optional[torch.dtype] = None) -> SAEAdam:
    """Adam, no weight decay: ``SAEAdam`` (one fused Triton kernel per parameter on CUDA that also
    applies the clip factor and rewrites the bf16 compute copies and decoder norms; torch's foreach
    Adam on CPU). ``moments_dtype=torch.bfloat16``: bf16 moments (off by default)."""
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    cuda = sae.W_enc.device.type == "cuda"
    return SAEAdam(params, lr=lr, betas=betas, eps=1e-8, moments_dtype=moments_dtype,
                   foreach=None if cuda else True)


class SAEStep:
    """One training step of a TopK SAE in normalised space (docs/method.md sec. 2-4), on any layout.

    ``step(x, y, t)`` takes raw activations ``x [B, d]`` (and targets ``y``, None for an SAE) of this
    rank's model group (its share of the step's global batch: ``B = batch / dp``; the whole batch in one
    process), normalises them with the SAE's ``norm_in`` / ``norm_out``, and returns detached scalar
    tensors (loss, explained variance of the batch, L0, ...). Nothing in it waits for the device.

    ``ctx`` is the member's ``ParallelContext``: in one process (the default) a 1 x 1 mesh whose
    collectives are no-ops, so the single process runs exactly the ops the sharded step runs on each
    shard. The model is this rank's ``ShardedTopKSAE`` (its rows of the latents; all of them at tp 1):
    a ``TopKSAE`` given here is adopted as the one shard, sharing its parameters, so an optimizer built
    on it trains it. The selection is the exact global (weighted) TopK over the model group, the losses
    are centred on the global batch, gradients are averaged over data groups and clipped by the global
    norm, and the dead-latent counters (full width, the same on every rank) count the firings of the
    whole world: every layout trains the single process's SAE.
    """

    def __init__(self, sae: Union[TopKSAE, ShardedTopKSAE], optimizer: torch.optim.Optimizer, cfg: StepConfig,
                 ctx: Optional[ParallelContext] = None) -> None:
        if (cfg.hold_dead or cfg.reset_dead_moments) and not isinstance(optimizer, SAEAdam):
            raise ValueError("hold_dead / reset_dead_moments: expected an SAEAdam optimizer (its row flags), got "
                             f"{type(optimizer).__name__}")
        if isinstance(sae, ShardedTopKSAE):
            ctx = sae.ctx if ctx is None else ctx
        else:
            ctx = ParallelContext(device=sae.W_enc.device) if ctx is None else ctx
            sae = ShardedTopKSAE.adopt(sae, ctx)
        self.sae, self.opt, self.cfg, self.ctx = sae, optimizer, cfg, ctx
        self.params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
        n, dev = sae.cfg.d_sae, sae.W_enc.device
        # Full-width counters (every latent of the SAE, identical on every rank of the member):
        # tokens since each latent last fired (dead latents, AuxK), its firings, and
        self.since_fired = torch.zeros(n, dtype=torch.int64, device=dev)
        self.fire_count = torch.zeros(n, dtype=torch.int64, device=dev)
        self.was_reset = torch.zeros(n, dtype=torch.bool, device=dev)  # reset_dead_moments, ever
        self.deaths = torch.zeros(n, dtype=torch.int64, device=dev)  # times each latent became dead
        self._tracking = False  # SAEAdam keeps the compute copies / decoder norms once asked
        self._fwd: Optional[ShardedTopK] = None  # this step's forward, kept for AuxK within the step
        # AuxK's candidates (``aux_candidates``): full-width latent ids, and the step that refreshes them
        self._aux_ids: Optional[Tensor] = None
        self._aux_next = 0
        if cfg.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture: expected one of {', '.join(ARCHITECTURES)}, got {cfg.architecture!r}")
        self.batch = cfg.architecture in ("batchtopk", "matryoshka_batchtopk")
        self.prefixes = (matryoshka_prefixes(cfg.matryoshka_widths or (n,), n)
                         if cfg.architecture == "matryoshka_batchtopk" else (n,))
        # BatchTopK's inference threshold: its EMA (sum and steps, for the bias correction)
        self.thr_ema = torch.zeros((), dtype=torch.float64, device=dev)
        self.thr_steps = torch.zeros((), dtype=torch.int64, device=dev)
        refresh = cfg.aux_refresh_steps
        self.aux_refresh_steps = (1 if dev.type == "cpu" else 64) if refresh is None else int(refresh)
        if self.aux_refresh_steps < 1:
            raise ValueError(f"aux_refresh_steps: expected an int >= 1, got {refresh!r}")

    # -- schedules
    def k_at(self, t: int) -> int:
        c = self.cfg
        return k_schedule(t, c.k, c.k_start, c.anneal_steps)

    def schedule_at(self, t: int) -> Dict[str, float]:
        """What the sparsity schedule sets at step ``t``: ``{"k": K}`` (K-annealing), or for ``standard``
        ``{"l1_coefficient": c}`` (its warmup)."""
        c = self.cfg
        if c.architecture == "standard":
            return {"l1_coefficient": l1_coefficient_at(t, c.l1_coefficient, c.l1_warmup_steps)}
        return {"k": self.k_at(t)}

    def lr_at(self, t: int) -> float:
        c = self.cfg
        return c.lr * lr_factor(t, c.total_steps, c.warmup_steps, c.decay_fraction)

    # -- the math
    def compute_weights(self) -> Tuple[Tuple[Tensor, Tensor, Tensor, Tensor], Optional[Tensor]]:
        """``((W_enc, b_enc, W_dec, b_dec) as the math reads them, decoder row norms or None)``: this
        shard's rows.

        With ``SAEAdam`` the compute-dtype copies and the fp32 decoder norms are rewritten by the
        optimizer's step (and recomputed if the masters were changed outside it): no cast, no norm
        pass per step. With another optimizer they are computed here (no autograd: the ops route
        the gradients to the masters)."""
        sae, dt = self.sae, self.cfg.compute_dtype
        masters = (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
        weighted = sae.cfg.weighted_topk
        if isinstance(self.opt, SAEAdam):
            if not self._tracking:
                for p in masters:
                    self.opt.track(p, copy_dtype=dt, row_norms=weighted and p is sae.W_dec)
                self._tracking = True
            copies = tuple(self.opt.compute_copy(p) for p in masters)
            return copies, (self.opt.row_norms(sae.W_dec) if weighted else None)
        with torch.no_grad():
            copies = masters if dt is None else tuple(p.detach().to(dt) for p in masters)
            norms = sae.W_dec.detach().float().norm(dim=1) if weighted else None
        return copies, norms

    def _out_dtype(self) -> torch.dtype:
        """The reconstructions' dtype: fp32 for a half compute dtype (the decode's fp32 sum, unrounded)."""
        return torch.promote_types(self.cfg.compute_dtype or self.sae.W_enc.dtype, torch.float32)

    def encode_decode(self, x_n: Tensor, k: int, keep_pre: Optional[bool] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """``(values, indices, x_hat_n)`` in normalised space: this rank's ``[B, min(k, d_sae/tp)]`` slots
        (global latent ids; slots that lost the global selection hold 0) and the full reconstruction
        (the same on the model group). Through ``trainer.parallel.sharded_forward``: the trainer's route
        of the ops (no host sync, indices trusted because the encode made them, fp32 master gradients).
        ``keep_pre`` (default: AuxK on): the encode keeps its pre-activations for ``auxk_loss``."""
        sae = self.sae
        (W_enc, b_enc, W_dec, _), dec_norm = self.compute_weights()
        keep_pre = self.cfg.auxk if keep_pre is None else keep_pre
        if self.batch:
            out = batch_topk_forward(
                self.ctx, x_n, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, k, sae.cfg.weighted_topk, sae.cfg.d_sae,
                dec_norm=dec_norm, compute=(W_enc, b_enc, W_dec), out_dtype=self._out_dtype(),
                prefixes=self.prefixes)
            self._threshold = out.threshold
            self.slots = max(g[1].shape[1] for g in out.groups)  # the fullest token's latents
        else:
            out = sharded_forward(self.ctx, x_n, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, k, sae.cfg.weighted_topk,
                                  sae.cfg.d_sae, dec_norm=dec_norm, compute=(W_enc, b_enc, W_dec),
                                  keep_pre=keep_pre, out_dtype=self._out_dtype())
        self._fwd = out
        return out.values, out.indices, out.x_hat

    def dense_forward(self, x_n: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``standard``: ``(x_hat, f, l1_t)`` (``trainer.parallel.dense_forward``) by plain autograd on the
        masters: nothing is sparse before the penalty has done its work."""
        sae = self.sae
        return dense_forward(self.ctx, x_n, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, self._out_dtype())

    def threshold(self) -> Optional[float]:
        """BatchTopK's inference threshold in score units (``relu(pre) * ||W_dec[i]||`` in normalised
        space): the bias-corrected EMA of the steps' thresholds after K-annealing (docs/method.md
        sec. 11); None before any such step or for another architecture. One host sync."""
        n = int(self.thr_steps)
        if not self.batch or n == 0:
            return None
        return float(self.thr_ema) / (1 - self.cfg.threshold_decay ** n)

    def loss_denominator(self, y_n: Tensor, mean: Tensor, var_t: Optional[Tensor] = None) -> Tensor:
        """What the reconstruction loss divides by: ``||y_t - mean||`` per token (``[B]``, the Llama
        Scope loss) or ``sum_t ||y_t - mean||^2`` over the global batch (FVU). ``var_t``: the row sums
        ``||y_t - mean||^2`` when already computed (``row_sq_error``)."""
        var_t = row_sq_error(y_n, mean) if var_t is None else var_t
        if self.cfg.loss == "llama_scope":
            return var_t.sqrt().clamp_min(1e-8)
        return self.ctx.data_mean(var_t.sum()).clamp_min(1e-12)

    def reduce_loss(self, err_t: Tensor, den: Tensor, d: int) -> Tensor:
        """The loss from row sums of squared errors ``err_t [B]`` and ``loss_denominator``'s ``den``:
        ``mean over elements of (x_hat - y)^2 / ||y_t - mean||`` = ``sum_t err_t / den_t / (B d)`` (Llama
        Scope) or ``sum_t err_t / den`` (FVU)."""
        if self.cfg.loss == "llama_scope":
            return (err_t / den).sum() / (err_t.shape[0] * d)
        return err_t.sum() / den

    @torch.no_grad()
    def aux_candidates(self, t: int, x_n: Tensor) -> Tensor:
        """AuxK's candidate latents at step ``t``: full-width int64 ids that include every latent dead at
        any step until the next refresh (every ``aux_refresh_steps`` steps: one host sync). A latent
        dead at step ``t + j`` has ``since_fired >= dead_window`` then, and ``since_fired`` grows by at
        most the global batch per step, so ``since_fired >= window - (R - 1) x batch`` at the refresh
        covers the next ``R`` steps; ``auxk_loss`` masks the dead among them exactly, so the refresh
        interval changes the work, never the result. Empty early in training (nothing can be dead yet):
        AuxK then costs nothing. Kept in ``state_dict``: a resumed run uses the same candidates."""
        if self._aux_ids is None or t >= self._aux_next:
            w, B, R = self.cfg.dead_window_tokens, self.tokens_per_step(x_n), self.aux_refresh_steps
            self._aux_ids = (self.since_fired >= w - (R - 1) * B).nonzero().squeeze(1)
            self._aux_next = t + R
        return self._aux_ids

    def auxk_loss(self, x_n: Tensor, y_n: Tensor, x_hat: Tensor, dead: Tensor, den: Tensor,
                  row_grads: Optional[RowGrads] = None) -> Tensor:
        """Gao et al.'s AuxK: the top-``k_aux`` dead latents reconstruct the detached residual
        ``y_n - x_hat`` (``row_sq_error(e_hat, y_n, offset=x_hat)``: one pass), measured like the main loss and divided by the *target's* statistics
        (``den``, from ``loss_denominator``): per element ``(e_hat - e)^2 / ||y_t - mean||`` averaged
        (Llama Scope loss) or ``sum (e_hat - e)^2 / sum (y - mean)^2`` (FVU), so ``auxk_coef`` weighs
        it against the main loss whatever the main loss (the residual's own variance, the earlier
        denominator, made AuxK outweigh a Llama Scope main loss by about two orders of magnitude).

        The selection is the exact global top-``k_aux`` among the dead latents of every shard
        (``trainer.parallel.sharded_select_decode``). In one model shard: dense over this step's
        candidates (``aux_candidates``) with the dead masked, from the forward's kept pre-activations,
        the candidate rows' gradients to ``row_grads`` (added after the backward): work in proportion
        to the candidates, not to d_sae. Zero when no latent is dead."""
        sae, fwd = self.sae, self._fwd
        self._fwd = None
        (_, _, W_dec, _), _ = self.compute_weights()
        mine = dead[sae.offset: sae.offset + sae.n_local]
        cands = self._aux_ids if self.ctx.tp == 1 else None  # tp 1: full-width ids are this shard's
        e_hat = sharded_select_decode(self.ctx, fwd.scores, mine, self.cfg.k_aux, sae.W_dec, compute=W_dec,
                                      d_sae=sae.cfg.d_sae, out_dtype=self._out_dtype(), candidates=cands,
                                      row_grads=row_grads)
        if e_hat is None:
            return torch.zeros((), device=y_n.device)
        err_t = row_sq_error(e_hat.float(), y_n, offset=x_hat.detach())
        return self.reduce_loss(err_t, den, y_n.shape[1]) * dead.any()

    def __call__(self, x: Tensor, y: Optional[Tensor], t: int) -> Dict[str, Tensor]:
        c, sae, ctx = self.cfg, self.sae, self.ctx
        k = self.k_at(t)
        lr = self.lr_at(t)
        for g in self.opt.param_groups:
            g["lr"] = lr
        dt = c.compute_dtype or sae.W_enc.dtype
        x_n = (x.to(dt) * sae.cfg.norm_in) if sae.cfg.norm_in != 1.0 else x.to(dt)
        y_src = x if y is None else y
        acc = torch.promote_types(y_src.dtype, torch.float32)  # fp32 sums, float64 for a float64 run
        y_n = y_src.to(acc) * sae.cfg.norm_out
        if t == 0 and c.data_init:
            self.init_from_data(x_n, y_n)
        if c.recentre_dead and t > 0:
            self.recentre_unreachable(x_n)
        # AuxK's candidates (a host sync only on refresh steps); none: no AuxK work, no kept pre-activations
        cands = self.aux_candidates(t, x_n) if c.auxk else None
        run_aux = cands is not None and cands.numel() > 0
        f = l1_t = fwd_scores = None
        if c.architecture == "standard":
            x_hat, f, l1_t = self.dense_forward(x_n)
            x_hats = [x_hat]
        else:
            values, indices, x_hat = self.encode_decode(x_n, k, keep_pre=run_aux)
            fwd_scores = self._fwd.scores
            # Matryoshka: each nested prefix's reconstruction (the forward decodes by bands of latents)
            x_hats = self._fwd.prefix_x_hats if self.batch else [x_hat]
        x_hat = x_hat.to(torch.promote_types(x_hat.dtype, torch.float32))
        # the losses and metrics from row sums of squares: one pass each (row_sq_error)
        mean = ctx.batch_mean(y_n)
        var_t = row_sq_error(y_n, mean)  # ||y_t - mean||^2
        err_t = row_sq_error(x_hat, y_n)  # ||x_hat_t - y_t||^2, differentiable in x_hat
        obj_t = err_t
        if len(x_hats) > 1:  # Matryoshka: the mean over the prefixes' reconstructions (the last is x_hat)
            obj_t = torch.stack([row_sq_error(xh.to(x_hat.dtype), y_n) for xh in x_hats[:-1]] + [err_t]).mean(0)
        if l1_t is not None:
            obj_t = obj_t + l1_coefficient_at(t, c.l1_coefficient, c.l1_warmup_steps) * l1_t
        den = self.loss_denominator(y_n, mean, var_t)
        loss = self.reduce_loss(obj_t, den, y_n.shape[1])
        total = loss
        aux = None
        dead = self.since_fired >= c.dead_window_tokens
        row_grads = RowGrads(cands) if run_aux and ctx.tp == 1 else None
        if run_aux:
            aux = self.auxk_loss(x_n, y_n, x_hat, dead, den, row_grads)
            total = loss + c.auxk_coef * aux
        elif c.auxk:
            aux = torch.zeros((), device=x_hat.device)
        total.backward()
        if row_grads is not None:
            row_grads.add_to()  # AuxK's gradients of the candidate rows
        if fwd_scores is not None:
            fwd_scores.release()  # nothing reads the kept pre-activations any more: the next step reuses them
        self._fwd = None
        ctx.sync_grads(self.params)
        scale = None
        if c.clip_grad_norm > 0:
            norm = ctx.grad_norm(self.params)
            scale = (c.clip_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        if isinstance(self.opt, SAEAdam):
            # the clip factor and the row flags are applied inside the fused update
            self.opt.step(grad_scale=scale, row_flags=self.row_flags(dead, x_n))
        else:
            if scale is not None:
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(scale.to(p.grad.dtype))
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            if f is None:
                fired = values > 0  # this rank's winners (losers of the global selection hold 0)
                counts = torch.zeros(sae.cfg.d_sae, dtype=torch.int64, device=values.device)
                counts.scatter_add_(0, indices.reshape(-1), fired.reshape(-1).long())
            else:
                fired = f > 0  # this shard's latents
                counts = torch.zeros(sae.cfg.d_sae, dtype=torch.int64, device=f.device)
                counts[sae.offset: sae.offset + sae.n_local] = fired.sum(0)
            # the firings of every latent on every data group's tokens: one all-reduce of d_sae ints
            counts = ctx.world_all_reduce(counts)
            self.advance_counters(self.since_fired, self.fire_count, self.deaths, counts, self.tokens_per_step(x_n))
            # sums over the global batch (one collective under data parallelism)
            err_var = ctx.data_mean(torch.stack([err_t.detach().sum(), var_t.sum()]))
            err, var = err_var[0], err_var[1].clamp_min(1e-12)
            out = {
                "loss": loss.detach(),
                "explained_variance": 1 - err / var,
                # each shard counts its winners (BatchTopK: a flat list of this rank's kept entries)
                "l0": ctx.model_all_reduce(fired.sum().float() / x_n.shape[0] if self.batch
                                           else fired.sum(-1).float().mean()),
                "dead_fraction": dead.float().mean(),
            }
            if aux is not None:
                out["auxk_loss"] = aux.detach()
            if self.batch:
                thr = self._threshold.double()
                out["threshold"] = thr
                if t >= c.anneal_steps:  # the threshold of the final K only
                    d = c.threshold_decay
                    self.thr_ema = d * self.thr_ema + (1 - d) * thr
                    self.thr_steps = self.thr_steps + 1
        return out

    @torch.no_grad()
    def init_from_data(self, x_n: Tensor, y_n: Tensor) -> None:
        """Data-dependent biases (``StepConfig.data_init``; the step calls it at ``t == 0``): ``b_dec``
        = ``b_dec_init`` x the batch mean of the normalised targets, ``b_enc = -W_enc @ mean(x_n)``.
        Every latent's pre-activation is then centred on the data: none starts negative on nearly every
        token because its random encoder row points away from the inputs' mean, and the latents do not
        all have to carry the mean while ``b_dec`` learns it (Adam moves a bias by about ``lr`` per
        step). Architecture and checkpoint format are unchanged. The means are over the global batch
        (``ParallelContext.batch_mean``), so every layout sets the same biases. ``b_dec_init < 1`` leaves
        part of the mean to the latents: at layer 12 of the embedded model the latents that carry it
        are also what reconstructs the rare massive-activation tokens (docs/method.md sec. 13)."""
        sae = self.sae
        mx = self.ctx.batch_mean(x_n.float())[0]
        my = self.ctx.batch_mean(y_n.float())[0]
        sae.b_enc.copy_((-(sae.W_enc.float() @ mx)).to(sae.b_enc.dtype))
        sae.b_dec.copy_((self.cfg.b_dec_init * my).to(sae.b_dec.dtype))

    @torch.no_grad()
    def row_flags(self, dead: Tensor, x_n: Tensor) -> Optional[Dict[Tensor, Tensor]]:
        """``SAEAdam`` row flags of this step's latents (W_enc, b_enc, W_dec rows), after the gradients
        are reduced; None when neither option is on.

        * ``reset_dead_moments``: a latent that becomes dead at this step (its AuxK training starts)
          gets a restarted Adam (``SAEAdam``'s RESET: zeroed moments, bias corrections counted from
          the reset), so AuxK's small gradients move it at the full step size instead of being divided
          by the second moments of its alive past (beta2 0.9999 remembers ~10k steps), and once it
          fires again it steps like a fresh Adam, not up to ~``sqrt(t / n)`` larger (n steps after the reset).
        * ``hold_dead``: a latent that is dead, or was ever reset (revived: its moments are young),
          and whose b_enc gradient is zero this step (no token selected it, AuxK did not train it)
          keeps its rows. Adam would otherwise move it on by its momentum for about
          ``1 / (1 - beta1)`` steps after each gradient; with young moments that is a full-size step
          per coordinate, which drove latents to a pre-activation <= 0 on every token (docs/method.md
          sec. 13). Latents that never died are never held: their momentum between the steps that
          select them is how rare latents learn.

        From the reduced gradients and the global counters: every layout flags the same latents."""
        c, sae = self.cfg, self.sae
        if not (c.hold_dead or c.reset_dead_moments):
            return None
        flags = torch.zeros(sae.n_local, dtype=torch.uint8, device=sae.b_enc.device)
        mine = slice(sae.offset, sae.offset + sae.n_local)  # this shard's latents
        if c.reset_dead_moments:
            newly = dead & (self.since_fired < c.dead_window_tokens + self.tokens_per_step(x_n))
            self.was_reset |= newly
            flags |= newly[mine].to(torch.uint8) * RESET
        if c.hold_dead and sae.b_enc.grad is not None:
            flags |= ((dead | self.was_reset)[mine] & (sae.b_enc.grad == 0)).to(torch.uint8) * HOLD
        return {sae.W_enc: flags, sae.b_enc: flags, sae.W_dec: flags}

    @torch.no_grad()
    def advance_counters(self, since: Tensor, fire: Tensor, deaths: Tensor, counts: Tensor, tokens: int) -> None:
        """The dead-latent counters after a step of ``tokens`` tokens whose winners fired ``counts``
        times per latent, from their values before it (``since``, ``fire``, ``deaths``): tokens since
        each latent last fired, its firings, and how often it became dead (``since_fired`` crossing
        ``dead_window_tokens``; a latent that dies, revives and dies again counts twice)."""
        w = self.cfg.dead_window_tokens
        new = torch.where(counts > 0, torch.zeros_like(since), since + tokens)
        self.deaths = deaths + ((new >= w) & (since < w)).long()
        self.fire_count = fire + counts
        self.since_fired = new

    def tokens_per_step(self, x_n: Tensor) -> int:
        """Tokens the dead-latent counters advance by per step: the global batch (every data group's share)."""
        return x_n.shape[0] * self.ctx.dp

    @torch.no_grad()
    def recentre_unreachable(self, x_n: Tensor) -> None:
        """Revive latents that AuxK cannot reach (``StepConfig.recentre_dead``). AuxK trains dead
        latents through ``relu(pre)``; a latent that died with ``pre <= 0`` on every token gets no
        gradient from it either, and stays dead. Once per dead window, the latents dead for at least
        two windows with no positive pre-activation on this batch get ``b_enc = -W_enc @ mean(x_n)``,
        the centred value of ``init_from_data``: positive on part of the data, so AuxK trains them.
        The decision uses the global counters and the global batch (mean over data groups), so every
        layout revives the same latents; one host sync when some are due."""
        c, sae = self.cfg, self.sae
        w, B = c.dead_window_tokens, self.tokens_per_step(x_n)
        sf = self.since_fired
        due = (sf >= 2 * w) & (sf % w < B)
        due = due[sae.offset: sae.offset + sae.n_local]  # this shard's rows (all of them at tp 1)
        if not bool(due.any()):
            return
        ids = due.nonzero().squeeze(1)
        W, b = sae.W_enc.index_select(0, ids).float(), sae.b_enc.index_select(0, ids).float()
        reach = (torch.addmm(b, x_n.float(), W.t()) > 0).any(0).float()
        unreachable = self.ctx.data_mean(reach) == 0  # no positive pre on any data group's tokens
        mx = self.ctx.batch_mean(x_n.float())[0]
        new = torch.where(unreachable, -(W @ mx), b)
        sae.b_enc.index_copy_(0, ids, new.to(sae.b_enc.dtype))

    # -- state in single-process shapes (any layout writes and reads the same checkpoint)
    def full_state(self) -> Tuple[Optional[Dict[str, Tensor]], Optional[Dict[str, Any]]]:
        """``(SAE state dict, optimizer state dict)`` in single-process shapes, on CPU, on the member's
        rank 0 (None elsewhere). Every rank of the member must call it."""
        return gather_full_state(self.ctx, self.sae, self.opt)

    def load_full_state(self, sae_sd: Dict[str, Tensor], opt_sd: Dict[str, Any]) -> None:
        """Load single-process-shaped state (written by any layout) and keep this rank's rows."""
        shard_state(self.ctx, self.sae, self.opt, sae_sd, opt_sd)

    def full_sae(self) -> Optional[TopKSAE]:
        """The whole ``TopKSAE`` (on CPU) on the member's rank 0 (None elsewhere), for export and evaluation,
        as the architecture runs at inference (docs/method.md sec. 11): ``topk`` as trained; ``batchtopk`` and
        ``matryoshka_batchtopk`` as JumpReLU at the estimated threshold (``threshold``; the last step's
        before any step after K-annealing), ``standard`` as ReLU (JumpReLU at threshold 0)."""
        theta = self.threshold() if self.batch else None
        if self.batch and theta is None:
            theta = float(self._threshold) if getattr(self, "_threshold", None) is not None else 0.0
        sae = self.sae.to_full()
        if sae is None or self.cfg.architecture == "topk":
            return sae
        sae.cfg = sae.cfg.replace(activation="jumprelu")
        with torch.no_grad():
            sae.threshold.fill_(theta if self.batch else 0.0)
        return sae

    def state_dict(self) -> Dict[str, Tensor]:
        sd = {"since_fired": self.since_fired.cpu(), "fire_count": self.fire_count.cpu(),
              "was_reset": self.was_reset.cpu(), "deaths": self.deaths.cpu()}
        if self.batch:
            sd.update(thr_ema=self.thr_ema.cpu(), thr_steps=self.thr_steps.cpu())
        if self._aux_ids is not None:
            sd["aux_ids"] = self._aux_ids.cpu()
            sd["aux_next"] = torch.tensor(self._aux_next, dtype=torch.int64)
        return sd

    def load_state_dict(self, sd: Dict[str, Tensor]) -> None:
        dev = self.since_fired.device
        self.since_fired = sd["since_fired"].to(dev)
        self.fire_count = sd["fire_count"].to(dev)
        self.was_reset = sd["was_reset"].to(dev) if "was_reset" in sd else torch.zeros_like(self.was_reset)
        self.deaths = sd["deaths"].to(dev) if "deaths" in sd else torch.zeros_like(self.deaths)
        if self.batch and "thr_ema" in sd:
            self.thr_ema, self.thr_steps = sd["thr_ema"].to(dev), sd["thr_steps"].to(dev)
        if "aux_ids" in sd:  # the candidates the run was using (else refreshed at the next step)
            self._aux_ids, self._aux_next = sd["aux_ids"].to(dev), int(sd["aux_next"])
        else:
            self._aux_ids, self._aux_next = None, 0
