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
events of a latent by ``(-score, order of arrival)`` and keeping ``n`` (``tests/test_analyze.py``
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
        rows = torch.unique(lat)  # sorted latent ids touched by this batch
        n_old = rows.numel() * self.n
        all_lat = torch.cat([rows.repeat_interleave(self.n), lat])
        all_score = torch.cat([self.score[rows].reshape(-1), score])
        order = torch.sort(all_score, descending=True, stable=True).indices
        order = order[torch.sort(all_lat[order], stable=True).indices]
        s_lat = all_lat[order]
        first = torch.searchsorted(s_lat, s_lat)  # index of each latent's first row in the sorted list
        rank = torch.arange(s_lat.numel(), device=s_lat.device) - first
        keep = rank < self.n
        src, rank, s_lat = order[keep], rank[keep], s_lat[keep]
        slot = torch.searchsorted(rows, s_lat)  # row of `rows` each kept entry goes to

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
        self.keys, order = torch.sort(keys)
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
