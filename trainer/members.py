"""A run's members: the SAEs of a suite of one or many, each on the ranks that train it (docs/method.md sec. 10).

* ``Columns``: the activation buffer's column blocks, one per hook point the suite reads (each member's
  input, and its target for a transcoder), in member order. A row is a token and holds every block, so
  one permutation serves every member.
* ``dataset_norms``: each hook point's dataset-wise norm (docs/method.md sec. 3) from the buffer's first
  rows, the same tokens on every layout.
* ``member_seed``: a member's initialisation seed, a function of the run's seed and its name only (without a
  sweep's ``-k{K}``: the members of a sweep over K start alike).
* ``build_members``: on this rank, each member it trains: its SAE (its rows, all of them at tp 1), Adam and
  ``SAEStep`` over the member's context. A member trained in a suite equals the member trained alone.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from sae_kernels import SAEConfig, TopKSAE
from sae_kernels.sites import Site

from .config import MemberSpec, TrainConfig
from .data.buffer import ActivationBuffer, ProducerError
from .parallel import ParallelContext, ShardedTopKSAE
from .train import Member, SAEStep, StepConfig, make_optimizer


class Columns:
    """The buffer's column blocks: the distinct hook points of ``sites``, in order (``hooks``)."""

    def __init__(self, sites: Sequence[Site]) -> None:
        self.hooks: List[str] = []
        for site in sites:
            self.hooks += [h for h in site.reads if h not in self.hooks]
        self.index: Dict[str, int] = {h: i for i, h in enumerate(self.hooks)}

    def __len__(self) -> int:
        return len(self.hooks)

    def of(self, site: Site) -> Tuple[int, Optional[int]]:
        """``(block of the input, block of the target or None when the target is the input)``."""
        hook_in, hook_out = site.hooks
        return self.index[hook_in], None if hook_out == hook_in else self.index[hook_out]

    def blocks(self, site: Site) -> List[int]:
        """Every block ``site`` reads."""
        return [self.index[h] for h in site.reads]


def dataset_norms(buffer: ActivationBuffer, ctx: ParallelContext, columns: Columns, specs: Sequence[MemberSpec],
                  n_tokens: int, d_model: int, progress: bool = False
                  ) -> Tuple[Dict[str, Dict[str, float]], Dict[str, float], int]:
    """``({member: {"in": mu_in, "out": mu_out, "tokens": n}}, {hook: mu}, n)``: ``mu = mean_t ||x_t||`` over the first
    ``n_tokens`` non-special tokens of the run's one stream of contexts (summed over the ranks that made
    them: the same tokens as one process). Closes the buffer on failure."""
    try:
        rows, n = buffer.first_rows(n_tokens, progress=progress and ctx.is_main)
    except ProducerError:
        buffer.close()
        raise
    sums = torch.stack([rows[:, i * d_model:(i + 1) * d_model].double().norm(dim=-1).sum() for i in range(len(columns))])
    sums = ctx.world_all_reduce(sums.to(ctx.device)).cpu()
    if n == 0:
        buffer.close()
        raise ValueError("estimate_norm: no tokens (every token was special?)")
    mu = {h: float(sums[i]) / n for i, h in enumerate(columns.hooks)}
    norms = {}
    for m in specs:
        hook_in, hook_out = m.site.hooks
        norms[m.name] = {"in": mu[hook_in], "out": mu[hook_out], "tokens": n}
    return norms, mu, n


def member_seed(seed: int, name: str) -> int:
    """The seed of a member's initialisation: a function of the run's seed and the member's name only,
    so adding or removing members changes no other member."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:7], "little")


def build_members(cfg: TrainConfig, specs: Sequence[MemberSpec], contexts: Sequence[Optional[ParallelContext]],
                  columns: Columns, norms: Dict[str, Dict[str, float]], *, d_model: int, model_name: str,
                  device: torch.device, out: Path) -> List[Member]:
    """The members this rank trains (``contexts[i]`` None: member ``i`` is trained on other ranks).

    Every rank of a member builds the same full SAE (seeded by ``member_seed``, Llama Scope's
    initialisation, the member's dataset norms) and keeps its rows; the step computes in bf16 compute
    copies of fp32 masters with ``--precision bf16``."""
    compute_dtype = torch.bfloat16 if cfg.precision == "bf16" else None
    members: List[Member] = []
    for m, mc in zip(specs, contexts):
        if mc is None:
            continue
        hook_in, hook_out = m.site.hooks
        sae_cfg = SAEConfig(d_model=d_model, d_sae=m.expansion * d_model, k=cfg.k_of(m), weighted_topk=not cfg.plain_topk,
                            dtype="float32", hook_point_in=hook_in, hook_point_out=hook_out, model_name=model_name,
                            layer=m.layer, position=m.position)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            # seeded by the name without a sweep's -k{K}: the members of a K sweep start from one init
            # (only K differs between them), and each equals the SAE trained alone with its K
            torch.manual_seed(member_seed(cfg.seed, m.site.member(m.expansion)))
            sae = TopKSAE(sae_cfg, transcoder=m.site.transcoder, device=device)
        nm = norms[m.name]
        sae.cfg = sae.cfg.replace(norm_in=math.sqrt(d_model) / nm["in"], norm_out=math.sqrt(d_model) / nm["out"])
        sae = ShardedTopKSAE.from_full(sae, mc) if mc.tp > 1 else ShardedTopKSAE.adopt(sae, mc)
        step = SAEStep(sae, make_optimizer(sae, cfg.lr, (cfg.beta1, cfg.beta2)),
                       StepConfig.from_train_config(cfg.solo(m, d_model), compute_dtype), mc)
        block_in, block_out = columns.of(m.site)
        members.append(Member(m.name, out / m.name, step, block_in, block_out, extra_state={"norms": nm}))
    return members
