"""The trainer's ``SAEStep`` on a (data, model) mesh: the glue between ``trainer.train`` and
``trainer.parallel`` (SPEC.md sec. 8).

``ParallelSAEStep`` is a drop-in ``SAEStep`` for a ``ShardedTopKSAE``:

* ``__call__`` takes the model group's share of the step's global batch (``batch_size / dp`` tokens,
  the same on every rank of the group: ``trainer.parallel.RowExchange`` delivers it) and runs the
  single-process step on it;
* ``encode_decode`` / ``auxk_loss`` run the exact global (weighted) TopK over the row shards;
* ``ParallelCollectives`` averages gradients over the data dimension (``b_dec`` over the world),
  computes the global gradient norm for clipping, averages logged metrics over data ranks and
  provides the global batch mean (``batch_mean``) and data-group averages (``data_mean``);
* ``full_state`` / ``load_full_state`` gather the SAE and Adam to the single-process shapes on global
  rank 0 and re-shard them on load (resume with the same or a different ``--tp``).

The dead-latent counters stay full width (``d_sae``) and identical on every rank: each step's fire
counts (winners of this rank, global ids) are summed over the world.

Exactness with data parallelism (dp > 1) needs the step's losses to centre the targets on the mean
of the *global* batch: ``SAEStep`` must take it from ``self.comm.batch_mean(y_n)`` (and the FVU
denominator and the logged explained variance through ``self.comm.data_mean``, as
``trainer/train.py`` does). Without that hook each data-parallel group centres on
its own ``batch_size / dp`` tokens (what DDP implementations of Llama Scope do); tp-only runs are
exact either way.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from sae_kernels import TopKSAE

from .parallel import ParallelContext, ShardedTopKSAE, gather_full_state, shard_state
from .train import _DEAD_BIAS, Collectives, SAEStep, StepConfig, _normalised_sq_error


class ParallelCollectives(Collectives):
    """``Collectives`` over a ``ParallelContext`` (all no-ops for a world of one)."""

    def __init__(self, ctx: ParallelContext) -> None:
        self.ctx = ctx

    @property
    def rank(self) -> int:  # type: ignore[override]
        return self.ctx.rank

    @property
    def world_size(self) -> int:  # type: ignore[override]
        return self.ctx.world_size

    def all_reduce_grads(self, params: List[Tensor]) -> None:
        self.ctx.sync_grads(params)

    def grad_norm(self, params: List[Tensor]) -> Tensor:
        return self.ctx.grad_norm(params)

    def metric(self, t: Tensor) -> Tensor:
        # Values logged by the step are the same on every rank of a model group (the step reduces
        # the per-shard ones over the group); average them over data-parallel groups.
        return self.ctx.data_all_reduce(t.float(), "mean")

    def barrier(self) -> None:
        self.ctx.barrier()

    # Hooks the single-process step calls where the global batch matters (identity when alone).
    def batch_mean(self, y: Tensor) -> Tensor:
        """Mean over the global batch (all data-parallel groups) of ``y [N, d]``, as ``[1, d]``."""
        return self.ctx.data_all_reduce(y.mean(0, keepdim=True), "mean")

    def data_mean(self, t: Tensor) -> Tensor:
        """Mean over data-parallel groups (e.g. an FVU denominator)."""
        return self.ctx.data_all_reduce(t, "mean")


class ParallelSAEStep(SAEStep):
    """``SAEStep`` for a ``ShardedTopKSAE`` (see the module docstring). With the no-op context it
    computes exactly what ``SAEStep`` computes."""

    def __init__(self, sae: ShardedTopKSAE, optimizer: torch.optim.Optimizer, cfg: StepConfig,
                 ctx: ParallelContext) -> None:
        if not isinstance(sae, ShardedTopKSAE):
            raise ValueError(f"sae: expected a ShardedTopKSAE, got {type(sae).__name__}")
        super().__init__(sae, optimizer, cfg, ParallelCollectives(ctx))
        self.ctx = ctx

    def encode_decode(self, x_n: Tensor, k: int) -> Tuple[Tensor, Tensor, Tensor]:
        """``(values, global indices, x_hat_n)``: this rank's ``[N, min(k, d_sae/tp)]`` slots (losers
        of the global selection hold 0) and the full reconstruction (same on the model group)."""
        W_enc, b_enc, W_dec, b_dec = self.weights()
        out = self.ctx.sharded_forward(x_n, W_enc, b_enc, W_dec, b_dec, k, self.sae.cfg.weighted_topk,
                                       d_sae=self.sae.cfg.d_sae)
        self._selection = (out.values.detach(), out.indices)
        return out.values, out.indices, out.x_hat

    def tokens_per_step(self, x_n: Tensor) -> int:
        return x_n.shape[0] * self.ctx.dp

    def auxk_loss(self, x_n: Tensor, residual: Tensor, dead: Tensor, den: Tensor) -> Tensor:
        """AuxK with the exact global top-``k_aux`` over the dead latents of all shards: the same
        loss as the single-process step (its non-dead picks hold 0 and add nothing)."""
        W_enc, b_enc, W_dec, _ = self.weights()
        sae = self.sae
        dead_local = dead[sae.offset: sae.offset + sae.n_local]
        dead_bias = torch.where(dead_local, 0.0, _DEAD_BIAS).to(b_enc.dtype)
        out = self.ctx.sharded_forward(x_n, W_enc, b_enc + dead_bias, W_dec, None, self.cfg.k_aux,
                                       sae.cfg.weighted_topk, d_sae=sae.cfg.d_sae)
        return _normalised_sq_error(out.x_hat.float(), residual, den, self.cfg.loss) * dead.any()

    def __call__(self, x: Tensor, y: Optional[Tensor], t: int) -> Dict[str, Tensor]:
        if not self.ctx.distributed:
            return super().__call__(x, y, t)
        since, count, deaths = self.since_fired.clone(), self.fire_count.clone(), self.deaths.clone()
        out = super().__call__(x, y, t)
        # The step counted this rank's winners on its group's tokens; redo the counter update with
        # the counts of the whole world (every latent, every data group) so the full-width counters
        # are the single-process ones, identical on every rank. One all-reduce of d_sae ints.
        values, indices = self._selection
        with torch.no_grad():
            counts = torch.zeros_like(count)
            counts.scatter_add_(0, indices.reshape(-1), (values > 0).reshape(-1).long())
            counts = self.ctx.world_all_reduce(counts)
            self.advance_counters(since, count, deaths, counts, x.shape[0] * self.ctx.dp)
        if self.ctx.tp > 1 and "l0" in out:
            out["l0"] = self.ctx.model_all_reduce(out["l0"])  # each rank counted its own winners
        return out

    # ------------------------------------------------------------------ checkpoints

    def full_state(self) -> Tuple[Optional[Dict[str, Tensor]], Optional[Dict[str, Any]]]:
        """``(SAE state dict, optimizer state dict)`` with single-process shapes, on CPU, on global
        rank 0 (None elsewhere). Every rank must call it."""
        return gather_full_state(self.ctx, self.sae, self.opt)

    def load_full_state(self, sae_sd: Dict[str, Tensor], opt_sd: Dict[str, Any]) -> None:
        """Load single-process-shaped state (from any tp) and keep this rank's rows."""
        shard_state(self.ctx, self.sae, self.opt, sae_sd, opt_sd)

    def full_sae(self) -> Optional[TopKSAE]:
        """The gathered ``TopKSAE`` on global rank 0 (None elsewhere), for export and evaluation."""
        return self.sae.to_full()
