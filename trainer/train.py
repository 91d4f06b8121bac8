"""The training loop: Llama Scope's recipe (SPEC.md sec. 2-4) on a stream of activation batches.

* ``estimate_norm``: dataset-wise norm ``mu = mean_t ||x_t||``; the SAE trains on ``s * x`` with
  ``s = sqrt(d_model) / mu``, separately for inputs and targets.
* ``SAEStep``: one optimiser step (weighted TopK encode, sparse decode, Llama Scope or FVU loss,
  optional AuxK, gradient clipping, Adam, schedules, dead-latent counters) with no host sync. It
  takes a ``Collectives`` object (single-process by default) so that a data / tensor parallel
  trainer can wrap or subclass it: override ``encode_decode`` for sharded latents and the
  ``Collectives`` methods for the all-reduces.
* ``Trainer``: the loop around it: metrics.jsonl every ``log_every`` steps, tqdm counted in tokens,
  atomic resumable checkpoints (SAE, Adam, buffer, RNG, counters) every ``checkpoint_every`` steps.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from sae_kernels import TopKSAE, sparse_decode, topk_encode
from sae_kernels.ops import subset_decode, topk_encode_aux

from .schedules import k_schedule, lr_factor

_DEAD_BIAS = -1e30  # large negative, finite: pushes alive latents out of the AuxK selection


# ----------------------------------------------------------------------------------- pieces


@torch.no_grad()
def estimate_norm(x: Tensor) -> float:
    """``mean_t ||x_t||_2`` in float64 (SPEC.md sec. 3)."""
    if x.shape[0] == 0:
        raise ValueError("estimate_norm: no tokens (every token was special?)")
    return float(x.double().norm(dim=-1).mean())


def llama_scope_loss(x_hat: Tensor, y: Tensor, mean: Optional[Tensor] = None) -> Tensor:
    """Mean over elements of ``(x_hat - y)^2 / ||y_t - mean_batch(y)||_2`` (clamped at 1e-8).
    ``mean``: the batch mean ``[1, d]`` if it is not ``y``'s (data parallelism: the global batch)."""
    mean = y.mean(0, keepdim=True) if mean is None else mean
    den = (y - mean).norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return ((x_hat - y).pow(2) / den).mean()


def _normalised_sq_error(x_hat: Tensor, target: Tensor, den: Tensor, loss: str) -> Tensor:
    """The main loss's form for any (prediction, target) pair with given denominators ``den``
    (``SAEStep.loss_denominator``): ``mean((x_hat - target)^2 / den)`` or ``sum(...) / den``."""
    if loss == "llama_scope":
        return ((x_hat - target).pow(2) / den).mean()
    return (x_hat - target).pow(2).sum() / den


def fvu_loss(x_hat: Tensor, y: Tensor, mean: Optional[Tensor] = None, reduce=None) -> Tensor:
    """``sum (x_hat - y)^2 / sum (y - mean_batch(y))^2`` (fraction of variance unexplained).
    ``mean`` / ``reduce``: global batch mean and denominator average under data parallelism."""
    mean = y.mean(0, keepdim=True) if mean is None else mean
    den = (y - mean).pow(2).sum()
    den = den if reduce is None else reduce(den)
    return (x_hat - y).pow(2).sum() / den.clamp_min(1e-12)


class Collectives:
    """Single-process collectives. A parallel trainer passes a subclass that all-reduces.

    The step calls ``all_reduce_grads`` after backward, ``grad_norm`` for clipping (a sharded
    model must reduce the squared norms of its shards) and ``metric`` on logged values.
    """

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_grads(self, params: List[Tensor]) -> None:
        """Average gradients over data-parallel ranks (no-op here)."""

    def grad_norm(self, params: List[Tensor]) -> Tensor:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=params[0].device)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))

    def metric(self, t: Tensor) -> Tensor:
        """Average a logged scalar over data-parallel ranks (no-op here)."""
        return t

    def barrier(self) -> None:
        """Synchronise ranks (no-op here)."""

    def batch_mean(self, y: Tensor) -> Tensor:
        """Mean of the whole step's batch over tokens, ``[1, d]`` (data parallel: all groups)."""
        return y.mean(0, keepdim=True)

    def data_mean(self, t: Tensor) -> Tensor:
        """Average of a per-group value over data-parallel groups (no-op here)."""
        return t


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
    # At step 0, before the update: b_dec = mean of the batch's (normalised) targets and
    # b_enc = -W_enc @ mean of its inputs (``SAEStep.init_from_data``). Off in the released recipe.
    data_init: bool = False
    b_dec_init: float = 1.0  # with data_init: b_dec starts at this fraction of the target mean
    # Once per dead window, latents dead for two windows whose pre-activation is <= 0 on every token
    # of the batch (out of AuxK's reach) get b_enc = -W_enc @ mean(x_n) (``SAEStep.recentre_unreachable``).
    recentre_dead: bool = False

    @classmethod
    def from_train_config(cls, c, compute_dtype: Optional[torch.dtype] = None) -> "StepConfig":
        return cls(
            k=c.k, k_start=c.k_start, total_steps=c.total_steps,
            anneal_steps=int(c.k_anneal_fraction * c.total_steps), warmup_steps=c.warmup_steps,
            decay_fraction=c.decay_fraction, lr=c.lr, clip_grad_norm=c.clip_grad_norm, loss=c.loss,
            auxk=c.auxk, auxk_coef=c.auxk_coef, k_aux=c.k_aux, dead_window_tokens=c.dead_window_tokens,
            compute_dtype=compute_dtype, data_init=c.data_init, b_dec_init=c.b_dec_init_fraction,
            recentre_dead=c.recentre_dead,
        )


def make_optimizer(sae: TopKSAE, lr: float, betas: Tuple[float, float]) -> torch.optim.Adam:
    """Adam, no weight decay (fused on CUDA, foreach on CPU)."""
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    cuda = sae.W_enc.device.type == "cuda"
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=1e-8, fused=True if cuda else None,
                            foreach=None if cuda else True)


class SAEStep:
    """One training step of a TopK SAE in normalised space (SPEC.md sec. 2-4).

    ``step(x, y, t)`` takes raw activations ``x [B, d]`` (and targets ``y``, None for an SAE),
    normalises them with the SAE's ``norm_in`` / ``norm_out``, and returns detached scalar tensors
    (loss, explained variance of the batch, L0, ...). Nothing in it waits for the device.
    """

    def __init__(self, sae: TopKSAE, optimizer: torch.optim.Optimizer, cfg: StepConfig,
                 collectives: Optional[Collectives] = None) -> None:
        self.sae, self.opt, self.cfg = sae, optimizer, cfg
        self.comm = collectives or Collectives()
        self.params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
        dev = sae.W_enc.device
        # tokens since each latent last fired (dead-latent tracking, AuxK)
        self.since_fired = torch.zeros(sae.d_sae, dtype=torch.int64, device=dev)
        self.fire_count = torch.zeros(sae.d_sae, dtype=torch.int64, device=dev)

    # -- schedules
    def k_at(self, t: int) -> int:
        c = self.cfg
        return k_schedule(t, c.k, c.k_start, c.anneal_steps)

    def lr_at(self, t: int) -> float:
        c = self.cfg
        return c.lr * lr_factor(t, c.total_steps, c.warmup_steps, c.decay_fraction)

    # -- the math; a tensor-parallel version overrides this
    def weights(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        dt = self.cfg.compute_dtype
        W = (self.sae.W_enc, self.sae.b_enc, self.sae.W_dec, self.sae.b_dec)
        if dt is None or dt == self.sae.W_enc.dtype:
            return W
        return tuple(w.to(dt) for w in W)  # differentiable casts: fp32 master weights get the grads

    def encode_decode(self, x_n: Tensor, k: int) -> Tuple[Tensor, Tensor, Tensor]:
        """``(values [B, k], indices [B, k], x_hat_n [B, d])`` in normalised space."""
        W_enc, b_enc, W_dec, b_dec = self.weights()
        dec_norm = W_dec.detach().float().norm(dim=1).to(W_dec.dtype) if self.sae.cfg.weighted_topk else None
        values, indices = topk_encode(x_n, W_enc, b_enc, k, dec_norm, check_finite_input=False)
        x_hat = sparse_decode(values, indices, W_dec, b_dec, check_indices=False)
        return values, indices, x_hat

    def encode_decode_auxk(self, x_n: Tensor, k: int, dead: Tensor
                           ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tuple[Tensor, Tensor, Tensor]]]:
        """``encode_decode`` plus the AuxK selection from the same pre-activations: per token the
        top-``k_aux`` of the dead latents (by the same score). Returns ``(values, indices, x_hat_n,
        (aux_acts [B, m], dead ids [m], W_dec) or None when no latent is dead)``. The dead-latent ids
        size the auxiliary selection: one host sync per step (only with AuxK on)."""
        ids = dead.nonzero().squeeze(1)
        if ids.numel() == 0:
            return (*self.encode_decode(x_n, k), None)
        W_enc, b_enc, W_dec, b_dec = self.weights()
        dec_norm = W_dec.detach().float().norm(dim=1).to(W_dec.dtype) if self.sae.cfg.weighted_topk else None
        values, indices, aux_acts = topk_encode_aux(
            x_n, W_enc, b_enc, k, dec_norm, aux_latents=ids, k_aux=self.cfg.k_aux,
            check_finite_input=False, check_aux_latents=False)
        x_hat = sparse_decode(values, indices, W_dec, b_dec, check_indices=False)
        return values, indices, x_hat, (aux_acts, ids, W_dec)

    def loss_denominator(self, y_n: Tensor, mean: Tensor) -> Tensor:
        """What the reconstruction loss divides by: ``||y_t - mean||`` per token (``[B, 1]``, the Llama
        Scope loss) or ``sum_t ||y_t - mean||^2`` over the global batch (FVU)."""
        if self.cfg.loss == "llama_scope":
            return (y_n - mean).norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return self.comm.data_mean((y_n - mean).pow(2).sum()).clamp_min(1e-12)

    def auxk_loss(self, x_n: Tensor, residual: Tensor, dead: Tensor,
                  selection: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
                  den: Optional[Tensor] = None) -> Tensor:
        """Gao et al.'s AuxK: the top-``k_aux`` dead latents reconstruct the detached residual
        ``y_n - x_hat_n``, measured like the main loss and divided by the *target's* statistics
        (``den``, from ``loss_denominator``): per element ``(e_hat - e)^2 / ||y_t - mean||`` averaged
        (Llama Scope loss) or ``sum (e_hat - e)^2 / sum (y - mean)^2`` (FVU). So ``auxk_coef`` (1/32)
        weighs it against the main loss as in Gao et al., whatever the main loss.
        ``selection``: what ``encode_decode_auxk`` returned (None: no latent is dead, the loss is 0)."""
        if selection is None:
            return torch.zeros((), device=residual.device)
        aux_acts, ids, W_dec = selection
        e_hat = subset_decode(aux_acts, W_dec, ids).float()  # dense over the m dead latents: one GEMM
        return _normalised_sq_error(e_hat, residual, den, self.cfg.loss)

    def __call__(self, x: Tensor, y: Optional[Tensor], t: int) -> Dict[str, Tensor]:
        c, sae = self.cfg, self.sae
        k = self.k_at(t)
        lr = self.lr_at(t)
        for g in self.opt.param_groups:
            g["lr"] = lr
        dt = c.compute_dtype or sae.W_enc.dtype
        x_n = (x.to(dt) * sae.cfg.norm_in) if sae.cfg.norm_in != 1.0 else x.to(dt)
        y_src = x if y is None else y
        y_n = y_src.float() * sae.cfg.norm_out
        if t == 0 and c.data_init:
            self.init_from_data(x_n, y_n)
        if c.recentre_dead and t > 0:
            self.recentre_unreachable(x_n)
        dead = self.since_fired >= c.dead_window_tokens
        aux_sel = None
        if c.auxk:
            values, indices, x_hat, aux_sel = self.encode_decode_auxk(x_n, k, dead)
        else:
            values, indices, x_hat = self.encode_decode(x_n, k)
        x_hat = x_hat.float()
        mean = self.comm.batch_mean(y_n)
        loss = (llama_scope_loss(x_hat, y_n, mean) if c.loss == "llama_scope"
                else fvu_loss(x_hat, y_n, mean, self.comm.data_mean))
        total = loss
        aux = None
        if c.auxk:
            aux = self.auxk_loss(x_n, (y_n - x_hat).detach(), dead, aux_sel, self.loss_denominator(y_n, mean))
            total = loss + c.auxk_coef * aux
        total.backward()
        self.comm.all_reduce_grads(self.params)
        if c.clip_grad_norm > 0:
            norm = self.comm.grad_norm(self.params)
            scale = (c.clip_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(scale.to(p.grad.dtype))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            fired = values > 0
            counts = torch.zeros(sae.d_sae, dtype=torch.int64, device=values.device)
            counts.scatter_add_(0, indices.reshape(-1), fired.reshape(-1).long())
            self.fire_count += counts
            self.since_fired = torch.where(counts > 0, torch.zeros_like(self.since_fired),
                                           self.since_fired + x.shape[0])
            # sums over the global batch (one collective under data parallelism)
            err_var = self.comm.data_mean(torch.stack([(x_hat - y_n).pow(2).sum(), (y_n - mean).pow(2).sum()]))
            err, var = err_var[0], err_var[1].clamp_min(1e-12)
            out = {
                "loss": loss.detach(),
                "explained_variance": 1 - err / var,
                "l0": fired.sum(-1).float().mean(),
                "dead_fraction": dead.float().mean(),
            }
            if aux is not None:
                out["auxk_loss"] = aux.detach()
        return out

    @torch.no_grad()
    def init_from_data(self, x_n: Tensor, y_n: Tensor) -> None:
        """Data-dependent biases (``StepConfig.data_init``; the step calls it at ``t == 0``): ``b_dec``
        = ``b_dec_init`` x the batch mean of the normalised targets, ``b_enc = -W_enc @ mean(x_n)``. Every latent's
        pre-activation is then centred on the data: none starts negative on nearly every token
        because its random encoder row points away from the inputs' mean, and the decoder does
        not have to spend latents on the mean while ``b_dec`` learns it (Adam moves a bias by
        about ``lr`` per step). At init this is what subtracting ``b_dec`` before the encoder
        (sparsify) gives, without changing the architecture or the checkpoint format. The means
        are over the global batch (``Collectives.batch_mean``), so every layout sets the same biases.
        ``b_dec_init < 1`` leaves part of the mean to the latents: at layer 12 of the embedded model the
        latents that carry it are also what reconstructs the rare massive-activation tokens (README)."""
        sae = self.sae
        mx = self.comm.batch_mean(x_n.float())[0]
        my = self.comm.batch_mean(y_n.float())[0]
        sae.b_enc.copy_((-(sae.W_enc.float() @ mx)).to(sae.b_enc.dtype))
        sae.b_dec.copy_((self.cfg.b_dec_init * my).to(sae.b_dec.dtype))

    def tokens_per_step(self, x_n: Tensor) -> int:
        """Tokens the dead-latent counters advance by per step (the global batch)."""
        return x_n.shape[0]

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
        off, n = getattr(sae, "offset", 0), sae.W_enc.shape[0]
        due = due[off: off + n]  # this shard's rows (all of them in one process)
        if not bool(due.any()):
            return
        ids = due.nonzero().squeeze(1)
        W, b = sae.W_enc.index_select(0, ids).float(), sae.b_enc.index_select(0, ids).float()
        reach = (torch.addmm(b, x_n.float(), W.t()) > 0).any(0).float()
        unreachable = self.comm.data_mean(reach) == 0  # no positive pre on any data group's tokens
        mx = self.comm.batch_mean(x_n.float())[0]
        new = torch.where(unreachable, -(W @ mx), b)
        sae.b_enc.index_copy_(0, ids, new.to(sae.b_enc.dtype))

    def state_dict(self) -> Dict[str, Tensor]:
        return {"since_fired": self.since_fired.cpu(), "fire_count": self.fire_count.cpu()}

    def load_state_dict(self, sd: Dict[str, Tensor]) -> None:
        dev = self.since_fired.device
        self.since_fired = sd["since_fired"].to(dev)
        self.fire_count = sd["fire_count"].to(dev)


# ----------------------------------------------------------------------------------- checkpoints


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def rng_state() -> Dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class StopTraining(Exception):
    """Raised by ``Trainer.fit`` when ``stop_after_steps`` is reached (the run is resumable)."""


# ----------------------------------------------------------------------------------- the loop


class Trainer:
    """Runs ``SAEStep`` over a batch source with logging, progress and resumable checkpoints.

    Args:
        step: the ``SAEStep`` (holds the SAE and the optimiser).
        batches: object with ``next_batch() -> (x, y)`` (``ActivationBuffer``); its
            ``state_dict``/``load_state_dict`` go into checkpoints when present.
        total_steps, batch_size: the run's length. run_dir: where metrics.jsonl and the resume
            state go. extra_state: JSON-able facts stored in checkpoints (config, norms).
    """

    STATE_FILE = "resume/state.pt"

    def __init__(
        self,
        step: SAEStep,
        batches,
        *,
        total_steps: int,
        batch_size: int,
        run_dir: Path,
        log_every: int = 100,
        checkpoint_every: int = 0,
        stop_after_steps: Optional[int] = None,
        progress: bool = True,
        extra_state: Optional[Dict[str, Any]] = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.step_fn, self.batches = step, batches
        self.total_steps, self.batch_size = total_steps, batch_size
        self.run_dir = Path(run_dir)
        self.log_every, self.checkpoint_every = max(1, log_every), checkpoint_every
        self.stop_after_steps = stop_after_steps
        self.progress = progress and step.comm.is_main
        self.extra_state = dict(extra_state or {})
        self.log = log
        self.t = 0  # steps done
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.elapsed = 0.0  # training seconds before this process (resume)
        self._sums: Dict[str, Tensor] = {}  # metrics summed since the last log line
        self._n_acc = 0

    # -- checkpoints
    @property
    def state_path(self) -> Path:
        return self.run_dir / self.STATE_FILE

    def save_checkpoint(self) -> None:
        step, comm = self.step_fn, self.step_fn.comm
        if hasattr(step, "full_state"):  # sharded: single-process shapes, gathered on rank 0
            sae_sd, opt_sd = step.full_state()
        else:
            sae_sd = {k: v.detach().cpu() for k, v in step.sae.state_dict().items()}
            opt_sd = step.opt.state_dict()
        buffer = self.batches.state_dict() if hasattr(self.batches, "state_dict") else None
        if comm.world_size > 1:
            # every rank has its own buffer and data position: one file per rank, before state.pt
            atomic_torch_save({"buffer": buffer, "rng": rng_state()}, self.run_dir / f"resume/rank{comm.rank}.pt")
            buffer = None
            comm.barrier()
        if comm.is_main:
            state = {
                "version": 1,
                "step": self.t,
                "elapsed": self.elapsed + (time.perf_counter() - self._t0 if hasattr(self, "_t0") else 0.0),
                "sae_cfg": step.sae.cfg.to_dict(),
                "sae": sae_sd,
                "optimizer": opt_sd,
                "step_state": step.state_dict(),
                "buffer": buffer,
                "rng": rng_state(),
                "world_size": comm.world_size,
                "extra": self.extra_state,
                "metric_sums": ({k: v.detach().cpu() for k, v in self._sums.items()}, self._n_acc),
            }
            atomic_torch_save(state, self.state_path)
        comm.barrier()

    def load_checkpoint(self, state: Dict[str, Any]) -> None:
        """Restore everything from ``state`` (``torch.load`` of ``state_path``) before ``fit``."""
        step, comm = self.step_fn, self.step_fn.comm
        if hasattr(step, "load_full_state"):  # re-shards to this run's tp
            step.load_full_state(state["sae"], state["optimizer"])
        else:
            sae = step.sae
            sae.load_state_dict({k: v.to(sae.W_enc.device) for k, v in state["sae"].items()})
            step.opt.load_state_dict(state["optimizer"])
        step.load_state_dict(state["step_state"])
        rank_file = self.run_dir / f"resume/rank{comm.rank}.pt"
        if comm.world_size > 1 or state.get("buffer") is None:
            same = int(state.get("world_size", 1)) == comm.world_size and rank_file.is_file()
            own = torch.load(rank_file, map_location="cpu", weights_only=False) if same else None
            if own is None:
                self.log(f"rank {comm.rank}: no buffer state for this world size; the data stream restarts")
            elif own["buffer"] is not None:
                self.batches.load_state_dict(own["buffer"])
            set_rng_state(own["rng"] if own is not None else state["rng"])
        else:
            if state.get("buffer") is not None:
                self.batches.load_state_dict(state["buffer"])
            set_rng_state(state["rng"])
        self.t = int(state["step"])
        self.elapsed = float(state.get("elapsed", 0.0))
        sums, n_acc = state.get("metric_sums", ({}, 0))
        dev = step.sae.W_enc.device
        self._sums, self._n_acc = {k: v.to(dev) for k, v in sums.items()}, n_acc
        # metrics.jsonl: keep the lines up to the checkpoint, drop what the killed run wrote after it
        if comm.is_main and self.metrics_path.exists():
            keep = [ln for ln in self.metrics_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= self.t]
            self.metrics_path.write_text("".join(ln + "\n" for ln in keep))

    # -- the loop
    def fit(self) -> Dict[str, float]:
        from tqdm.auto import tqdm

        self.run_dir.mkdir(parents=True, exist_ok=True)
        total_tokens = self.total_steps * self.batch_size
        bar = tqdm(total=total_tokens, initial=self.t * self.batch_size, unit="tok", unit_scale=True,
                   dynamic_ncols=True, disable=not self.progress, desc="train", smoothing=0.1)
        last: Dict[str, float] = {}
        self._t0 = time.perf_counter()
        t_log, tok_log = self._t0, 0
        mf = open(self.metrics_path, "a") if self.step_fn.comm.is_main else None
        try:
            while self.t < self.total_steps:
                x, y = self.batches.next_batch()
                m = self.step_fn(x, y, self.t)
                for key, v in m.items():
                    self._sums[key] = self._sums[key] + v if key in self._sums else v.clone()
                self._n_acc += 1
                self.t += 1
                bar.update(self.batch_size)
                tok_log += x.shape[0]
                if self.t % self.log_every == 0 or self.t == self.total_steps:
                    vals = {key: float(self.step_fn.comm.metric(v / self._n_acc))  # host sync
                            for key, v in self._sums.items()}
                    now = time.perf_counter()
                    rec = {"step": self.t, "tokens": self.t * self.batch_size, **vals,
                           "k": self.step_fn.k_at(self.t - 1), "lr": self.step_fn.lr_at(self.t - 1),
                           "tokens_per_s": tok_log * self.step_fn.comm.world_size / max(now - t_log, 1e-9)}
                    last = rec
                    if mf is not None:
                        mf.write(json.dumps(rec) + "\n")
                        mf.flush()
                    bar.set_postfix(loss=f"{rec['loss']:.4g}", ev=f"{rec['explained_variance']:.3f}",
                                    l0=f"{rec['l0']:.1f}", k=rec["k"], tok_s=f"{rec['tokens_per_s']:.0f}")
                    self._sums, self._n_acc, t_log, tok_log = {}, 0, now, 0
                if self.checkpoint_every and self.t % self.checkpoint_every == 0 and self.t < self.total_steps:
                    self.save_checkpoint()
                if self.stop_after_steps is not None and self.t >= self.stop_after_steps and self.t < self.total_steps:
                    if not (self.checkpoint_every and self.t % self.checkpoint_every == 0):
                        self.save_checkpoint()
                    raise StopTraining(f"stopped after {self.t} steps (--stop-after-steps); continue with --resume")
        finally:
            bar.close()
            if mf is not None:
                mf.close()
        self.elapsed += time.perf_counter() - self._t0
        return last
