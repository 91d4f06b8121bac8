"""One LM pass over a corpus, every SAE given: per-latent statistics and example contexts.

For each SAE and each latent, streamed batch by batch on the sparse codes (``values, indices
[B, T, k]``; never a tokens x d_sae array):

* ``count`` (tokens where the latent is active), ``sum`` of its activations (mean = sum / count,
  over active tokens), ``max`` (the best top context's peak);
* the top-``n`` contexts: every context scores the latent's maximum activation in it (its peak;
  the earliest position among equal maxima), and the ``n`` contexts with the largest peaks are kept
  (ties: the earlier context), with the window of activations around the peak;
* ``samples`` events drawn uniformly from all active tokens (a reservoir: each event gets a seeded
  uniform priority, the largest priorities are kept, exactly, with ``StreamingTopN``), which the
  export splits into activation quantile groups;
* an activation histogram with log-spaced bins (``HIST_PER_OCTAVE`` per octave from
  ``2**HIST_MIN_EXP``).

Activations are those of the SAE as a user runs it (``TopKSAE.from_llama_scope``: folded norms,
so for a Llama Scope SAE the latent value is the method's inference activation). Special tokens
(BOS, EOS, PAD) are not encoded: they show in windows with activation 0.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
from torch import Tensor

from ..data.lm import LoadedModel, capture_hooks, run_capture, site_of, special_mask
from .stream import StreamingTopN, WindowLookup

HIST_PER_OCTAVE = 4
HIST_MIN_EXP = -20  # bins cover [2**-20, 2**20): folded activations of real SAEs sit well inside
HIST_BINS = 40 * HIST_PER_OCTAVE


def hist_edges() -> List[float]:
    """The ``HIST_BINS + 1`` bin edges of every latent histogram (bin 0 also takes values below)."""
    return [2.0 ** (HIST_MIN_EXP + i / HIST_PER_OCTAVE) for i in range(HIST_BINS + 1)]


@dataclass
class PassConfig:
    top_n: int = 20
    samples: int = 12
    before: int = 20
    after: int = 6
    seed: int = 0

    @property
    def window(self) -> int:
        return self.before + self.after + 1


class LatentStats:
    """The streaming accumulators of one SAE (see the module docstring)."""

    def __init__(self, d_sae: int, cfg: PassConfig, device: torch.device) -> None:
        self.d_sae, self.cfg, self.device = d_sae, cfg, device
        self.count = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.hist = torch.zeros(d_sae * HIST_BINS, dtype=torch.int64, device=device)
        self.top = StreamingTopN(d_sae, cfg.top_n, cfg.window, device)
        self.samp = StreamingTopN(d_sae, cfg.samples, cfg.window, device) if cfg.samples else None
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.n_tokens = 0

    @torch.no_grad()
    def update(self, values: Tensor, indices: Tensor, ctx0: int, n_tokens: int) -> None:
        """One batch of contexts ``ctx0 .. ctx0+B-1``: codes ``values, indices [B, T, k]`` (zero values
        at special tokens and in padding slots); ``n_tokens`` non-special tokens were encoded."""
        B, T, _ = values.shape
        self.n_tokens += n_tokens
        b, t, j = (values > 0).nonzero(as_tuple=True)  # row-major: stream order
        lat = indices[b, t, j]
        val = values[b, t, j].float()
        if lat.numel() == 0:
            return
        self.count += torch.bincount(lat, minlength=self.d_sae)
        self.sum.index_add_(0, lat, val.double())
        bins = (torch.log2(val) - HIST_MIN_EXP).mul_(HIST_PER_OCTAVE).floor_().clamp_(0, HIST_BINS - 1).long()
        self.hist.index_add_(0, lat * HIST_BINS + bins, torch.ones_like(bins))
        c = self.cfg

        lookup: List[WindowLookup] = []  # built on first use: later batches often need no window at all

        def windows(lat_s: Tensor, b_s: Tensor, p_s: Tensor) -> Tensor:
            if not lookup:
                lookup.append(WindowLookup(values, indices, self.d_sae))
            return lookup[0].windows(lat_s, b_s, p_s, c.before, c.after)

        # top contexts: each (latent, context) scores its peak; the earliest position among equal peaks
        key = lat * B + b
        peak = torch.full((self.d_sae * B,), float("-inf"), device=val.device).scatter_reduce_(0, key, val, "amax")
        at_peak = val == peak[key]
        ppos = torch.full((self.d_sae * B,), T, dtype=torch.int64, device=val.device).scatter_reduce_(
            0, key[at_peak], t[at_peak], "amin")
        ck = torch.isfinite(peak).nonzero().squeeze(1)  # ascending: by latent, then context
        c_lat, c_b, c_pos, c_val = ck // B, ck % B, ppos[ck], peak[ck]
        self.top.push(c_lat, c_val, c_b + ctx0, c_pos, c_val,
                      lambda s: windows(c_lat[s], c_b[s], c_pos[s]))
        if self.samp is not None:  # uniform reservoir over active tokens: largest random priorities
            prio = torch.rand(lat.numel(), generator=self.gen, device=val.device)
            self.samp.push(lat, prio, b + ctx0, t, val, lambda s: windows(lat[s], b[s], t[s]))


# ----------------------------------------------------------------------------------- the LM pass


@contextlib.contextmanager
def capture_points(model, points: Sequence[Tuple[int, str]]) -> Iterator[Tuple[Dict[str, Tensor], Dict[Tuple[int, str], str]]]:
    """The SAE inputs of every (layer, position) of ``points`` from one forward that stops once they all
    exist (``capture_hooks``): yields ``(store, hook)``, ``hook[point]`` the point's hook name; call
    ``run_capture(base, ids, store)``, then read ``store[hook[point]]``."""
    hook = {pt: site_of(pt[0], pt[1]).reads[0] for pt in points}
    with capture_hooks(model, list(dict.fromkeys(hook.values())), stop=True) as store:
        yield store, hook


def _encode(sae, x: Tensor, chunk: int = 8192) -> Tuple[Tensor, Tensor]:
    p = next(sae.parameters())
    vs, ids = [], []
    for s in range(0, x.shape[0], chunk):
        v, i = sae.encode_sparse(x[s:s + chunk].to(device=p.device, dtype=p.dtype))
        vs.append(v.float())
        ids.append(i)
    return torch.cat(vs), torch.cat(ids)


def _dense_codes(v: Tensor, i: Tensor, keep: Tensor) -> Tuple[Tensor, Tensor]:
    """Sparse codes of the kept tokens -> ``[B, T, k]`` with zeros at the special tokens."""
    B, T = keep.shape
    values = torch.zeros((B, T, v.shape[1]), dtype=v.dtype, device=v.device)
    indices = torch.zeros((B, T, v.shape[1]), dtype=i.dtype, device=i.device)
    kk = keep.to(v.device)
    values[kk] = v
    indices[kk] = i
    return values, indices


@torch.no_grad()
def analysis_pass(
    lm: LoadedModel,
    saes: Dict[str, Tuple[object, int, str]],
    contexts: Tensor,
    special_ids: Sequence[int],
    cfg: PassConfig,
    *,
    batch_size: int = 4,
    progress: bool = False,
    lm_only: bool = False,
) -> Tuple[Dict[str, LatentStats], Dict[str, float]]:
    """Stream ``contexts [n, T]`` once through the LM (up to the deepest layer any SAE reads) and through
    every SAE of ``saes`` (name -> (module, layer, position)). Returns the stats of each SAE and timings.
    ``lm_only`` runs the same LM forwards and captures without the SAEs (the benchmark's baseline)."""
    points = sorted({(layer, pos) for _, layer, pos in saes.values()})
    base = getattr(lm.model, "model", lm.model)  # the decoder stack: no LM head
    stats = {} if lm_only else {
        name: LatentStats(sae.cfg.d_sae, cfg, next(sae.parameters()).device) for name, (sae, _, _) in saes.items()
    }
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=int(contexts.numel()), unit="tok", desc="analysis", dynamic_ncols=True)
    t_lm = t_sae = 0.0
    n_tok = 0
    with capture_points(lm.model, points) as (store, hook):
        for s in range(0, len(contexts), batch_size):
            ids = contexts[s:s + batch_size].to(lm.device)
            t0 = time.perf_counter()
            run_capture(base, ids, store)
            keep = ~special_mask(ids, special_ids)
            acts = {pt: store[h][keep] for pt, h in hook.items()}
            t1 = time.perf_counter()
            t_lm += t1 - t0
            n_keep = int(keep.sum())
            n_tok += n_keep
            for name, (sae, layer, pos) in saes.items():
                if lm_only:
                    continue
                v, i = _encode(sae, acts[(layer, pos)])
                values, indices = _dense_codes(v, i, keep)
                stats[name].update(values, indices, s, n_keep)
            t_sae += time.perf_counter() - t1
            if bar is not None:
                bar.update(int(ids.numel()))
    if bar is not None:
        bar.close()
    return stats, {"lm_s": t_lm, "sae_s": t_sae, "total_s": t_lm + t_sae, "tokens": n_tok}


def peak_context_maxima(stats: LatentStats) -> Tensor:
    """Largest activation of each latent over the corpus (0 for latents that never fired)."""
    m = stats.top.score[:, 0]
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def mean_activation(stats: LatentStats) -> Tensor:
    return torch.where(stats.count > 0, stats.sum / stats.count.clamp_min(1), torch.zeros_like(stats.sum))


def frequency(stats: LatentStats) -> Tensor:
    return stats.count.double() / max(stats.n_tokens, 1)


__all__ = ["PassConfig", "LatentStats", "analysis_pass", "capture_points", "hist_edges", "frequency",
           "mean_activation", "peak_context_maxima"]
