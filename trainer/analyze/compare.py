"""Feature geometry across two SAEs (e.g. L12R-8x against L12R-32x): decoder-cosine matches,
feature-splitting families and a 2-D map of the decoder directions.

* Matches: for every latent of A its most similar latent of B (cosine of the decoder directions),
  and the same from B to A. Computed in blocks of ``block_a x block_b`` cosines: the running top-m
  of each row and the running best of each column are merged block by block, so no ``d_a x d_b``
  matrix ever exists (32K x 128K fp32 would be 16 GiB).
* Families (feature splitting): a latent of the narrower SAE and the latents of the wider one whose
  cosine with it is at least ``threshold`` (at most ``family_max`` of them, the most similar; a
  family that reached the cap says so). ``cofire`` counts, on a corpus, the tokens where the parent
  and each child are active together (``cofire.py``).
* Nearest latents within one SAE (``nearest_latents``): the same blocked search of an SAE against
  itself, its diagonal left out.
* Map: the decoder directions of both SAEs projected on the first two principal components of
  their union (or UMAP, when ``umap-learn`` is installed and asked for).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor


def unit_rows(W: Tensor) -> Tensor:
    """Rows scaled to unit norm (zero rows stay zero), fp32."""
    W = W.detach().float()
    n = W.norm(dim=1, keepdim=True)
    return W / torch.where(n > 0, n, torch.ones_like(n))


@torch.no_grad()
def blocked_matches(A: Tensor, B: Tensor, top: int = 1, block_a: int = 4096, block_b: int = 16384,
                    exclude_self: bool = False) -> Dict[str, Tensor]:
    """Cosine matches between the rows of ``A [n_a, d]`` and ``B [n_b, d]`` (unit rows), in blocks.

    Returns ``a_top_ids, a_top_cos [n_a, top]`` (each A row's ``top`` most similar B rows, best first)
    and ``b_best_id, b_best_cos [n_b]`` (each B row's most similar A row). Ties: the smaller id.
    ``exclude_self`` (A and B the same rows: one SAE's nearest latents) leaves out row i's match with
    itself, so ``top`` is at most ``n_b - 1``.
    """
    n_a, n_b = A.shape[0], B.shape[0]
    top = min(top, n_b - 1 if exclude_self else n_b)
    dev = A.device
    a_cos = torch.full((n_a, top), float("-inf"), device=dev)
    a_ids = torch.zeros((n_a, top), dtype=torch.int64, device=dev)
    b_cos = torch.full((n_b,), float("-inf"), device=dev)
    b_ids = torch.zeros((n_b,), dtype=torch.int64, device=dev)
    for sb in range(0, n_b, block_b):
        Bb = B[sb:sb + block_b].to(dev)
        for sa in range(0, n_a, block_a):
            S = A[sa:sa + block_a] @ Bb.t()  # [block_a, block_b]
            if exclude_self and sa < sb + Bb.shape[0] and sb < sa + S.shape[0]:
                r = torch.arange(S.shape[0], device=dev)
                c = r + sa - sb
                on = (c >= 0) & (c < S.shape[1])
                S[r[on], c[on]] = float("-inf")
            # rows: merge the block's top with the running top (running first: earlier = smaller ids)
            t = S.topk(min(top, S.shape[1]), dim=1)
            cat_cos = torch.cat([a_cos[sa:sa + block_a], t.values], 1)
            cat_ids = torch.cat([a_ids[sa:sa + block_a], t.indices + sb], 1)
            o = _sort_desc_then_id(cat_cos, cat_ids)[:, :top]
            a_cos[sa:sa + block_a] = cat_cos.gather(1, o)
            a_ids[sa:sa + block_a] = cat_ids.gather(1, o)
            # columns: best A row of each B row (strictly better: earlier A blocks win ties)
            cm = S.max(dim=0)
            better = cm.values > b_cos[sb:sb + block_b]
            b_cos[sb:sb + block_b] = torch.where(better, cm.values, b_cos[sb:sb + block_b])
            b_ids[sb:sb + block_b] = torch.where(better, cm.indices + sa, b_ids[sb:sb + block_b])
    return {"a_top_ids": a_ids, "a_top_cos": a_cos, "b_best_id": b_ids, "b_best_cos": b_cos}


def _sort_desc_then_id(cos: Tensor, ids: Tensor) -> Tensor:
    """Column order of each row: cosine descending, then id ascending."""
    o = torch.sort(ids, dim=1, stable=True).indices
    o2 = torch.sort(cos.gather(1, o), dim=1, descending=True, stable=True).indices
    return o.gather(1, o2)


@torch.no_grad()
def nearest_latents(W_dec: Tensor, top: int, block: int = 4096) -> Tuple[Tensor, Tensor]:
    """Each latent's ``top`` nearest other latents of the same SAE by decoder cosine: ``(ids, cos)
    [d_sae, top]``, best first (ties: the smaller id), computed in ``block x 4 block`` blocks (never
    the full d_sae x d_sae matrix)."""
    D = unit_rows(W_dec)
    m = blocked_matches(D, D, top=top, block_a=block, block_b=4 * block, exclude_self=True)
    return m["a_top_ids"], m["a_top_cos"]


@torch.no_grad()
def families(parent_top_ids: Tensor, parent_top_cos: Tensor, threshold: float) -> Dict[str, Tensor]:
    """Families from each parent's top matches: children with cosine >= ``threshold``.

    Returns CSR-like ``offsets [n_parent + 1]``, ``child [n_pairs]``, ``cos [n_pairs]``, ``parent
    [n_pairs]`` and ``capped [n_parent]`` (the parent's last kept match is above the threshold: the
    family may have more members than were searched)."""
    ok = parent_top_cos >= threshold
    parent = ok.nonzero()[:, 0]
    counts = ok.sum(1)
    offsets = torch.zeros(parent_top_ids.shape[0] + 1, dtype=torch.int64, device=ok.device)
    offsets[1:] = counts.cumsum(0)
    return {"offsets": offsets, "parent": parent, "child": parent_top_ids[ok], "cos": parent_top_cos[ok],
            "capped": ok[:, -1]}


@torch.no_grad()
def pca_2d(X: Tensor, fit: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Projection of the rows of ``X [n, d]`` on the first two principal components of the rows
    ``fit`` selects (default all; float64 covariance, eigendecomposition of the d x d matrix;
    deterministic sign: the largest-|loading| coordinate of each component is positive).
    Returns ``(coords [n, 2], explained [2])`` (explained: fractions of the fitted rows' variance)."""
    Xd = X.double()
    F_ = Xd if fit is None else Xd[fit]
    mu = F_.mean(0)
    C = torch.zeros((X.shape[1], X.shape[1]), dtype=torch.float64, device=X.device)
    for s in range(0, F_.shape[0], 65536):
        Z = F_[s:s + 65536] - mu
        C += Z.t() @ Z
    C /= max(F_.shape[0] - 1, 1)
    evals, evecs = torch.linalg.eigh(C)
    V = evecs[:, -2:].flip(1)
    sign = torch.sign(V.gather(0, V.abs().argmax(0, keepdim=True)))
    V = V * sign
    coords = torch.cat([(Xd[s:s + 65536] - mu) @ V for s in range(0, X.shape[0], 65536)])
    total = evals.clamp_min(0).sum()
    return coords.float(), (evals[-2:].flip(0) / total).float()


def umap_2d(X: Tensor, seed: int = 0) -> Optional[Tensor]:
    """UMAP of the rows (cosine metric) when ``umap-learn`` is installed; None otherwise."""
    try:
        import umap  # type: ignore
    except ImportError:
        return None
    emb = umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(X.float().cpu().numpy())
    return torch.as_tensor(emb, dtype=torch.float32)


@torch.no_grad()
def cofire_counts(codes_p: Tuple[Tensor, Tensor], codes_c: Tuple[Tensor, Tensor], parent: Tensor, child: Tensor,
                  n_parent: int) -> Tuple[Tensor, Tensor]:
    """Co-firing on one batch of tokens: ``codes_p`` / ``codes_c`` are the sparse codes ``(values,
    indices) [N, k]`` of the parent and child SAEs on the same N tokens; ``(parent[j], child[j])`` the
    family pairs. Returns ``(pair [n_pairs], any [n_parent])``: tokens where both of pair j are active,
    and tokens where a parent is active together with at least one of its children. Sparse: each
    active parent's pairs are looked up among the sorted active (token, child latent) keys."""
    vp, ip = codes_p
    vc, ic = codes_c
    dev = parent.device
    pair_counts = torch.zeros(parent.numel(), dtype=torch.int64, device=dev)
    any_counts = torch.zeros(n_parent, dtype=torch.int64, device=dev)
    if parent.numel() == 0 or vp.shape[0] == 0:
        return pair_counts, any_counts
    tok_p, slot_p = (vp > 0).nonzero(as_tuple=True)
    lat_p = ip[tok_p, slot_p].to(dev)
    tok_c, slot_c = (vc > 0).nonzero(as_tuple=True)
    lat_c = ic[tok_c, slot_c].to(dev)
    tok_p, tok_c = tok_p.to(dev), tok_c.to(dev)
    order = torch.argsort(parent, stable=True)  # pairs grouped by parent
    sp = parent[order]
    lo = torch.searchsorted(sp, lat_p)
    n_each = torch.searchsorted(sp, lat_p, right=True) - lo
    if int(n_each.sum()) == 0:
        return pair_counts, any_counts
    rep_tok = tok_p.repeat_interleave(n_each)
    first = (torch.cumsum(n_each, 0) - n_each).repeat_interleave(n_each)
    pair = order[lo.repeat_interleave(n_each) + torch.arange(rep_tok.numel(), device=dev) - first]
    width = int(max(int(child.max()), int(lat_c.max()) if lat_c.numel() else 0)) + 1
    keys = torch.sort(tok_c * width + lat_c).values
    if keys.numel() == 0:
        return pair_counts, any_counts
    q = rep_tok * width + child[pair]
    at = torch.searchsorted(keys, q).clamp_max(keys.numel() - 1)
    hit = keys[at] == q
    pair_counts.index_add_(0, pair[hit], torch.ones(int(hit.sum()), dtype=torch.int64, device=dev))
    # (token, parent) with at least one child active
    tp = torch.unique(rep_tok[hit] * n_parent + parent[pair[hit]])
    any_counts.index_add_(0, tp % n_parent, torch.ones_like(tp))
    return pair_counts, any_counts
