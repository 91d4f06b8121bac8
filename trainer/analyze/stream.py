"""Exact streaming per-latent selections on sparse codes (never a tokens x d_sae array).

``StreamingTopN`` keeps, per latent, the ``n`` events with the largest score seen so far, with the
context id, position, activation and a window of the latent's activations around the event. Each
``push`` merges one batch of candidates with the kept rows of the latents they touch:

1. drop candidates whose score does not beat their latent's current ``n``-th best (one gather);
2. sort the survivors together with the kept rows of their latents: by score (descending, stable),
   then by latent (stable), so each latent's rows come out best first;
3. keep the first ``n`` of each latent; compute windows only for the newcomers that stayed.

Ties: candidates arrive in stream order and the kept rows of a latent are always earlier than a
batch's candidates, so among equal scores the earlier event wins; the result equals sorting all
events of a latent by ``(-score, order of arrival)`` and keeping ``n`` (``tests/e2e/test_analyze.py``
checks it against a dense brute force).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

NEG_INF = float("-inf")


class StreamingTopN:
    """Per-latent exact top-``n`` of scored events, merged batch by batch.

    Stored per latent, best first: ``score [d_sae, n]`` (-inf in empty slots), ``ctx`` (int64, -1
    when empty), ``pos`` (int32), ``value`` (the activation at the event) and, when ``window > 0``,
    ``window [d_sae, n, window]`` (the latent's activations around the event).
    """

    def __init__(self, d_sae: int, n: int, window: int, device: torch.device | str = "cpu") -> None:
        if n < 1:
            raise ValueError(f"n: expected >= 1, got {n}")
        self.d_sae, self.n, self.w = d_sae, n, window
        self.score = torch.full((d_sae, n), NEG_INF, dtype=torch.float32, device=device)
        self.ctx = torch.full((d_sae, n), -1, dtype=torch.int64, device=device)
        self.pos = torch.zeros((d_sae, n), dtype=torch.int32, device=device)
        self.value = torch.zeros((d_sae, n), dtype=torch.float32, device=device)
        self.window = torch.zeros((d_sae, n, window), dtype=torch.float32, device=device) if window else None

    def push(self, lat: Tensor, score: Tensor, ctx: Tensor, pos: Tensor, value: Tensor,
             window_fn: Optional[Callable[[Tensor], Tensor]] = None) -> int:
        """Merge candidates (1-D, in arrival order) into the selection; returns how many survived the
        threshold. ``window_fn(sel)`` gives the windows ``[len(sel), window]`` of candidates ``sel``."""
        if lat.numel() == 0:
            return 0
        score = score.float()
        ok = score > self.score[lat, -1]
        sel = ok.nonzero().squeeze(1)
        m = int(sel.numel())  # one host sync per batch
        if m == 0:
            return 0
        lat, score = lat[sel], score[sel]
        dev = lat.device
        touched = torch.zeros(self.d_sae, dtype=torch.bool, device=dev)
        touched[lat] = True
        rows = touched.nonzero().squeeze(1)  # sorted latent ids touched by this batch (no sort needed)
        n_old = rows.numel() * self.n
        all_lat = torch.cat([rows.repeat_interleave(self.n), lat])
        all_score = torch.cat([self.score[rows].reshape(-1), score])
        # One stable sort by (latent ascending, score descending): both in one int64 key, sorted as one row
        # of a 2-D tensor (a single-threaded sort: the parallel radix sort of 1-D integer tensors is ~3x
        # slower on 2 cores shared with other work, 450 vs 145 ms at 240k keys). Equal keys keep their
        # order: kept rows first (best first), then the candidates in arrival order.
        key = all_lat * (1 << 32) + _descending_key(all_score)
        order = torch.sort(key.view(1, -1), dim=1, stable=True).indices.view(-1)
        s_lat = all_lat[order]
        counts = torch.bincount(all_lat, minlength=self.d_sae)
        first = (torch.cumsum(counts, 0) - counts)[s_lat]  # index of each latent's first row in the sorted list
        rank = torch.arange(s_lat.numel(), device=dev) - first
        keep = rank < self.n
        src, rank, s_lat = order[keep], rank[keep], s_lat[keep]
        slot_of = torch.empty(self.d_sae, dtype=torch.int64, device=dev)
        slot_of[rows] = torch.arange(rows.numel(), device=dev)
        slot = slot_of[s_lat]  # row of `rows` each kept entry goes to

        def merged(old: Tensor, new: Tensor, fill) -> Tensor:
            flat = torch.cat([old[rows].reshape(n_old, *old.shape[2:]), new])
            out = torch.full((rows.numel(), self.n, *old.shape[2:]), fill, dtype=old.dtype, device=old.device)
            out[slot, rank] = flat[src]
            return out

        new_ctx, new_pos, new_val = ctx[sel], pos[sel].to(torch.int32), value[sel].float()
        if self.window is not None:
            fresh = src >= n_old  # newcomers that made it: only they need their windows computed
            win_new = torch.zeros((m, self.w), dtype=torch.float32, device=lat.device)
            idx = src[fresh] - n_old
            if idx.numel():
                assert window_fn is not None, "window_fn is needed when window > 0"
                win_new[idx] = window_fn(sel[idx]).float()
            self.window[rows] = merged(self.window, win_new, 0.0)
        self.ctx[rows] = merged(self.ctx, new_ctx, -1)
        self.pos[rows] = merged(self.pos, new_pos, 0)
        self.value[rows] = merged(self.value, new_val, 0.0)
        self.score[rows] = merged(self.score, score, NEG_INF)
        return m


def _descending_key(score: Tensor) -> Tensor:
    """int64 keys in ``[0, 2**32)`` whose ascending order is the descending order of the float32 ``score``
    (-inf last): the IEEE bits made monotone, then flipped."""
    b = (score.float() + 0.0).contiguous().view(torch.int32).long()  # + 0.0: -0.0 becomes 0.0, its equal
    mono = torch.where(b >= 0, b, b ^ 0x7FFFFFFF)  # signed order of the bits = order of the floats
    return (1 << 31) - 1 - mono


class WindowLookup:
    """Activations ``a[b, t, latent]`` of one batch of sparse codes, looked up by key.

    The batch's active entries are sorted once by ``(b * T + t) * d_sae + latent``; a window of W
    positions for S (latent, context, position) triples is then S x W binary searches, instead of
    comparing every slot of every position (S x W x k) -- 10x less work for the first batches,
    where nearly every latent takes new top contexts."""

    def __init__(self, values: Tensor, indices: Tensor, d_sae: int) -> None:
        B, T, k = values.shape
        self.T, self.d = T, d_sae
        live = values.reshape(-1) > 0
        rows = torch.arange(B * T, device=values.device).repeat_interleave(k)[live]
        keys = rows * d_sae + indices.reshape(-1)[live]
        keys, order = torch.sort(keys.view(1, -1), dim=1)  # one row: the single-threaded sort (see push)
        self.keys, order = keys.view(-1), order.view(-1)
        self.vals = values.reshape(-1)[live][order].float()

    def windows(self, lat: Tensor, b: Tensor, p: Tensor, before: int, after: int) -> Tensor:
        """Activations of latent ``lat[s]`` at positions ``p[s]-before .. p[s]+after`` of context ``b[s]``
        (0 outside the context and where the latent is inactive)."""
        offs = torch.arange(-before, after + 1, device=lat.device)
        P = p[:, None].long() + offs
        inside = (P >= 0) & (P < self.T)
        q = (b[:, None].long() * self.T + P.clamp(0, self.T - 1)) * self.d + lat[:, None]
        if self.keys.numel() == 0:
            return torch.zeros(q.shape, dtype=torch.float32, device=lat.device)
        at = torch.searchsorted(self.keys, q).clamp_max(self.keys.numel() - 1)
        hit = (self.keys[at] == q) & inside
        return torch.where(hit, self.vals[at], torch.zeros((), dtype=torch.float32, device=lat.device))


def latent_windows(values: Tensor, indices: Tensor, lat: Tensor, b: Tensor, p: Tensor, before: int, after: int,
                   chunk: int = 1024) -> Tensor:
    """Reference for ``WindowLookup.windows`` (tests): the same windows by comparing every slot."""
    B, T, k = values.shape
    offs = torch.arange(-before, after + 1, device=values.device)
    out = torch.empty((lat.numel(), offs.numel()), dtype=torch.float32, device=values.device)
    for s in range(0, lat.numel(), chunk):
        P = p[s:s + chunk, None].long() + offs  # [S, W]
        inside = (P >= 0) & (P < T)
        Pc = P.clamp(0, T - 1)
        bb = b[s:s + chunk, None].expand_as(Pc)
        hit = indices[bb, Pc] == lat[s:s + chunk, None, None]  # [S, W, k]: a latent appears once per token
        w = (values[bb, Pc].float() * hit).sum(-1)
        out[s:s + chunk] = torch.where(inside, w, torch.zeros_like(w))
    return out
