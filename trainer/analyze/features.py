"""One LM pass over a corpus, every SAE given: per-latent statistics and example contexts.

For each SAE and each latent, streamed batch by batch on the sparse codes (``values, indices
[B, T, k]``; never a tokens x d_sae array):

* ``count`` (tokens where the latent is active), ``sum`` of its activations (mean = sum / count,
  over active tokens), ``max`` (the best top example's peak);
* its top examples, several per context, their windows never overlapping: each context is cut into
  segments of ``window`` tokens; a segment where the latent is active offers its peak (the earliest
  position among equal maxima); where the windows of two neighbouring segments' peaks would overlap
  (peaks less than ``window`` apart) the larger peak wins (equal: the earlier), exactly as a greedy
  pass from the largest peak down would decide (``example_candidates``). The ``pool`` largest
  examples are kept (ties: the earlier context, then the earlier position), with the window of
  activations around each peak; the export picks ``top_n`` of them, spread over documents;
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

    @property
    def pool(self) -> int:
        """Examples kept per latent while streaming: twice ``top_n``, so that the export can prefer
        examples from different documents and still show ``top_n``."""
        return 2 * self.top_n


class LatentStats:
    """The streaming accumulators of one SAE (see the module docstring)."""

    def __init__(self, d_sae: int, cfg: PassConfig, device: torch.device) -> None:
        self.d_sae, self.cfg, self.device = d_sae, cfg, device
        self.count = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.hist = torch.zeros(d_sae * HIST_BINS, dtype=torch.int64, device=device)
        self.top = StreamingTopN(d_sae, cfg.pool, cfg.window, device)
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

        # top examples: segment peaks whose windows do not overlap, by latent, then context and position
        c_lat, c_b, c_pos, c_val = example_candidates(lat, b, t, val, B, T, c.window)
        self.top.push(c_lat, c_val, c_b + ctx0, c_pos, c_val,
                      lambda s: windows(c_lat[s], c_b[s], c_pos[s]))
        if self.samp is not None:  # uniform reservoir over active tokens: largest random priorities
            prio = torch.rand(lat.numel(), generator=self.gen, device=val.device)
            self.samp.push(lat, prio, b + ctx0, t, val, lambda s: windows(lat[s], b[s], t[s]))


@torch.no_grad()
def example_candidates(lat: Tensor, b: Tensor, t: Tensor, val: Tensor, B: int, T: int, W: int
                       ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """A batch's example peaks: ``(latent, context, position, value)`` of the active entries ``lat, b,
    t, val``, at most one per segment of ``W`` tokens of a context, no two of one latent and context
    closer than ``W`` positions (their windows of ``W`` tokens would overlap); ordered by latent, then
    context, then position (the stream order, which breaks ties).

    Each (latent, context, segment) offers its peak (earliest position among equal maxima). Only peaks
    of neighbouring segments can be closer than ``W``; such a conflict goes to the larger peak (equal:
    the earlier). Resolved in rounds: a peak that beats every undecided neighbour it conflicts with is
    kept, and its undecided conflicting neighbours are dropped -- the decisions of a greedy pass that
    keeps peaks from the largest down, skipping those that overlap a kept one."""
    dev = val.device
    nseg = -(-T // W)
    key = (lat * B + b) * nseg + torch.div(t, W, rounding_mode="floor")
    uk, inv = torch.unique(key, sorted=True, return_inverse=True)
    G = uk.numel()
    peak = torch.full((G,), float("-inf"), device=dev).scatter_reduce_(0, inv, val, "amax")
    at_peak = val == peak[inv]
    ppos = torch.full((G,), T, dtype=torch.int64, device=dev).scatter_reduce_(0, inv[at_peak], t[at_peak], "amin")
    grp = torch.div(uk, nseg, rounding_mode="floor")
    # conflict[i]: entries i and i + 1 are neighbouring segments of one (latent, context), peaks < W apart
    conflict = (grp[1:] == grp[:-1]) & (uk[1:] - uk[:-1] == 1) & (ppos[1:] - ppos[:-1] < W)
    if bool(conflict.any()):
        cr = torch.cat([conflict, conflict.new_zeros(1)])  # conflicts with the next entry
        cl = torch.cat([conflict.new_zeros(1), conflict])  # ... with the previous one
        beats_next = torch.cat([peak[:-1] >= peak[1:], peak.new_ones(1, dtype=torch.bool)])  # equal: the earlier
        beats_prev = torch.cat([peak.new_ones(1, dtype=torch.bool), peak[1:] > peak[:-1]])
        state = torch.zeros(G, dtype=torch.int8, device=dev)  # 0 undecided, 1 kept, 2 dropped
        state[~(cr | cl)] = 1
        z = state.new_zeros(1)
        while True:
            und = state == 0
            if not bool(und.any()):
                break
            nxt, prv = torch.cat([state[1:], z + 1]), torch.cat([z + 1, state[:-1]])
            keep = und & ~(cr & (nxt == 0) & ~beats_next) & ~(cl & (prv == 0) & ~beats_prev)
            state[keep] = 1
            nxt, prv = torch.cat([state[1:], z]), torch.cat([z, state[:-1]])
            state[(state == 0) & ((cr & (nxt == 1)) | (cl & (prv == 1)))] = 2
        sel = state == 1
        uk, peak, ppos, grp = uk[sel], peak[sel], ppos[sel], grp[sel]
    return torch.div(grp, B, rounding_mode="floor"), grp % B, ppos, peak


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


__all__ = ["PassConfig", "LatentStats", "analysis_pass", "capture_points", "example_candidates", "hist_edges", "frequency",
           "mean_activation", "peak_context_maxima"]
