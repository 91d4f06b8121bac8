"""The analysis's choices about examples and order, against brute force: which pooled examples a latent
shows (spread over documents), the document counts, and the default order's score."""
import math

import pytest
import torch

from trainer.analyze.export import PER_DOC, doc_spread, dominated, select_examples
from trainer.analyze.features import HIST_BINS, HIST_MIN_EXP, HIST_PER_OCTAVE
from trainer.analyze.order import BAND, band, concentration, hist_quantile_log2
from trainer.analyze.stream import StreamingTopN


def _pool(d, P, n_ctx, T, g):
    """A StreamingTopN-like pool: per latent a prefix of filled slots, best first."""
    top = StreamingTopN(d, P, 0)
    for l in range(d):
        m = int(torch.randint(0, P + 1, (1,), generator=g))
        top.ctx[l, :m] = torch.randint(0, n_ctx, (m,), generator=g)
        top.pos[l, :m] = torch.randint(0, T, (m,), generator=g).int()
        top.score[l, :m] = torch.sort(torch.rand(m, generator=g), descending=True).values
    return top


def test_select_examples_equals_the_rule_brute_force():
    g = torch.Generator().manual_seed(0)
    d, P, n, n_ctx, T = 60, 12, 6, 5, 9
    docs = torch.randint(0, 4, (n_ctx, T), generator=g).int()
    top = _pool(d, P, n_ctx, T, g)
    sel = select_examples(top, docs, n, chunk=7)
    cap = math.ceil(n / PER_DOC)
    for l in range(d):
        slots = [j for j in range(P) if top.ctx[l, j] >= 0]
        doc = [int(docs[top.ctx[l, j], top.pos[l, j]]) for j in slots]
        # the best slots keeping at most `cap` per document, then the best of the rest
        taken, per = [], {}
        for j, dj in zip(slots, doc):
            if len(taken) < n and per.get(dj, 0) < cap:
                taken.append(j)
                per[dj] = per.get(dj, 0) + 1
        taken = sorted(taken + [j for j in slots if j not in taken][:n - len(taken)])
        got = [j for j in sel["idx"][l].tolist() if j >= 0]
        assert got == taken, l
        assert [x for x in sel["doc"][l].tolist() if x >= 0] == [doc[slots.index(j)] for j in taken]
        sp = doc_spread(sel)
        ds = [doc[slots.index(j)] for j in taken]
        assert int(sp["examples"][l]) == len(taken) and int(sp["docs"][l]) == len(set(ds))
        assert int(sp["doc_max"][l]) == (max(ds.count(x) for x in ds) if ds else 0)
    # without document ids: the first n of the pool
    plain = select_examples(top, None, n)
    for l in range(d):
        m = int((top.ctx[l] >= 0).sum())
        assert plain["idx"][l].tolist() == list(range(min(n, m))) + [-1] * (n - min(n, m))


def test_dominated_latents():
    sel = {"idx": torch.tensor([[0, 1, 2, 3], [0, 1, 2, -1], [0, 1, -1, -1], [0, 1, 2, 3]]),
           "doc": torch.tensor([[5, 5, 5, 1], [2, 2, 3, -1], [4, 4, -1, -1], [1, 2, 1, 2]])}
    # 3 of 4 from one document; 2 of 3; too few examples to say; 2 of 4 is not more than half
    assert dominated(doc_spread(sel)) == [0, 1]


def test_band_and_concentration():
    lo, hi = BAND
    f = torch.tensor([lo, hi, math.sqrt(lo * hi), hi * 10, lo / 10, 0.9])
    assert band(f).tolist() == pytest.approx([1, 1, 1, 0.1, 0.1, 10 ** -math.log10(90)])
    # concentration from the log-spaced histogram against exact quantiles of the activations
    g = torch.Generator().manual_seed(0)
    rows = [torch.full((400,), 0.3) * (1 + 0.01 * torch.rand(400, generator=g)),  # one strength everywhere
            torch.exp(torch.randn(4000, generator=g) * 1.5),  # heavy tailed
            torch.rand(3000, generator=g) * 5 + 0.1]
    hist = torch.zeros(len(rows), HIST_BINS, dtype=torch.int64)
    for r, v in enumerate(rows):
        b = ((torch.log2(v) - HIST_MIN_EXP) * HIST_PER_OCTAVE).floor().clamp(0, HIST_BINS - 1).long()
        hist[r] = torch.bincount(b, minlength=HIST_BINS)
    c = concentration(hist)
    for r, v in enumerate(rows):
        exact = 1 - float(v.quantile(0.5) / v.quantile(0.9))
        assert abs(float(c[r]) - exact) < 0.1, (r, float(c[r]), exact)  # within a bin (2 ** 0.25)
        for q in (0.1, 0.5, 0.9):
            assert abs(float(hist_quantile_log2(hist[r:r + 1], q)) - math.log2(float(v.quantile(q)))) <= 1 / HIST_PER_OCTAVE
    assert float(c[0]) < 0.1 < 0.5 < float(c[1])  # one strength: one bin, 0.4 of its width between q50 and q90
