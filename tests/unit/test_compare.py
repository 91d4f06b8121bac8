"""The comparison's maths against brute force: blocked decoder-cosine matches, families and co-firing,
the 2-D map."""
import pytest
import torch

from helpers import assert_close

from trainer.analyze.compare import blocked_matches, cofire_counts, families, pca_2d, unit_rows


@pytest.mark.parametrize("n_a,n_b,top,ba,bb", [(37, 101, 5, 8, 16), (64, 64, 1, 64, 64), (50, 23, 30, 7, 5)])
def test_blocked_matches_equal_the_full_matrix(n_a, n_b, top, ba, bb):
    g = torch.Generator().manual_seed(n_a)
    A = unit_rows(torch.randn(n_a, 19, generator=g))
    B = unit_rows(torch.randn(n_b, 19, generator=g))
    B[3] = 0.0  # a dead (zero) decoder row stays a zero direction
    got = blocked_matches(A, B, top=top, block_a=ba, block_b=bb)
    S = A.double() @ B.double().t()
    t = min(top, n_b)
    want = S.topk(t, dim=1)
    assert torch.equal(got["a_top_ids"], want.indices), "A's top matches differ"
    assert_close(got["a_top_cos"].double(), want.values, rtol=0, atol=1e-6)
    bw = S.max(dim=0)
    assert torch.equal(got["b_best_id"], bw.indices)
    assert_close(got["b_best_cos"].double(), bw.values, rtol=0, atol=1e-6)


def test_families_and_cofiring_equal_brute_force():
    g = torch.Generator().manual_seed(0)
    n_p, n_c, N, k = 11, 40, 300, 4
    top_ids = torch.stack([torch.randperm(n_c, generator=g)[:6] for _ in range(n_p)])
    top_cos = torch.sort(torch.rand(n_p, 6, generator=g), dim=1, descending=True).values
    fam = families(top_ids, top_cos, 0.5)
    pairs = [(i, int(top_ids[i, j]), float(top_cos[i, j])) for i in range(n_p) for j in range(6) if top_cos[i, j] >= 0.5]
    assert list(zip(fam["parent"].tolist(), fam["child"].tolist())) == [(p, c) for p, c, _ in pairs]
    assert fam["capped"].tolist() == [bool(top_cos[i, -1] >= 0.5) for i in range(n_p)]
    # random sparse codes of N tokens (values 0 in some slots: inactive)
    def codes(n):
        ids = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(N)])
        vals = torch.rand(N, k, generator=g) * (torch.rand(N, k, generator=g) > 0.3)
        return vals, ids
    cp, cc = codes(n_p), codes(n_c)
    pc, anyc = cofire_counts(cp, cc, fam["parent"], fam["child"], n_parent=n_p)
    dp = torch.zeros(N, n_p, dtype=torch.bool).scatter_(1, cp[1], cp[0] > 0)
    dc = torch.zeros(N, n_c, dtype=torch.bool).scatter_(1, cc[1], cc[0] > 0)
    want = [int((dp[:, p] & dc[:, c]).sum()) for p, c, _ in pairs]
    assert pc.tolist() == want
    for i in range(n_p):
        kids = [c for p, c, _ in pairs if p == i]
        any_child = dc[:, kids].any(1) if kids else torch.zeros(N, dtype=torch.bool)
        assert int(anyc[i]) == int((dp[:, i] & any_child).sum())


def test_pca_2d_spans_the_top_two_components():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 7, generator=g) * torch.tensor([5.0, 3.0, 1, 1, 0.5, 0.3, 0.2]) + 2
    coords, explained = pca_2d(X)
    Z = X.double() - X.double().mean(0)
    U, S, V = torch.linalg.svd(Z, full_matrices=False)
    want = Z @ V[:2].t()
    for j in range(2):  # up to the sign of each component
        assert min((coords[:, j].double() - want[:, j]).abs().max(), (coords[:, j].double() + want[:, j]).abs().max()) < 1e-4
    assert_close(explained.double(), S[:2] ** 2 / (S ** 2).sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,top,block", [(53, 4, 8), (40, 39, 16), (300, 8, 64)])
def test_nearest_latents_equal_the_full_matrix_without_the_diagonal(n, top, block):
    from trainer.analyze.compare import nearest_latents

    g = torch.Generator().manual_seed(n)
    W = torch.randn(n, 11, generator=g) * (torch.rand(n, 1, generator=g) + 0.5)  # unequal norms: cosines
    ids, cos = nearest_latents(W, top, block=block)
    D = unit_rows(W).double()
    S = D @ D.t()
    S.fill_diagonal_(float("-inf"))
    want = S.topk(min(top, n - 1), dim=1)
    assert torch.equal(ids, want.indices)
    assert_close(cos.double(), want.values, rtol=0, atol=1e-6)
    assert not (ids == torch.arange(n)[:, None]).any()  # never the latent itself
