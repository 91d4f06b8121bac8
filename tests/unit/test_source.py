"""ActivationSource: LM batches -> chunks of non-special activations (every hook point's columns); the
deal of LM batches to ranks; cache; cursors; epochs."""
import pytest
import torch

from helpers import assert_close

from trainer.data import ContextData, DocumentSource
from sae_kernels.sites import Site
from trainer.data.lm import activations, load_model
from trainer.data.source import ActivationSource


@pytest.fixture(scope="module")
def setup(tiny_llama):
    lm = load_model(tiny_llama)
    texts = [f"doc {i}: " + "lorem ipsum " * (2 + i % 5) for i in range(30)]
    docs = DocumentSource("mem", lambda: iter(texts), in_memory=True)
    data = ContextData(docs, lm.tokenizer, 32, 4, eval_every=6, eval_contexts=2, seed=3)
    return lm, data


def chunks(src, n):
    out = []
    for c in src:
        out.append(c)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("position", ["R", "TC"])
def test_chunks_are_the_non_special_activations_of_each_batch(setup, position):
    lm, data = setup
    src = ActivationSource(lm, data, list(Site(1, position).reads))
    got = chunks(src, 2)
    row = 0
    for c, (key, ids) in zip(got, data.iter_batches(0)):
        keep = ~torch.isin(ids, torch.tensor(src.special_ids))
        x, y, k2 = activations(lm, ids, 1, position, special_ids=src.special_ids)
        assert torch.equal(k2.cpu(), keep) and c.x.shape[0] == int(keep.sum()) == c.n
        assert c.row0 == row and c.owner == 0
        row += c.n
        want = x if y is None else torch.cat([x, y], dim=1)  # a row holds every hook point side by side
        assert_close(c.x, want, rtol=0, atol=0)


def test_many_hooks_one_forward_and_the_deal_to_ranks(setup):
    """A suite's chunk holds every hook's columns, each equal to that hook read alone; with two ranks each
    runs the LM on its own LM batches only, and both know every batch's rows without running it."""
    lm, data = setup
    hooks = [*Site(0, "R").reads, *Site(2, "TC").reads]
    single = ActivationSource(lm, data, hooks)
    one = chunks(single, data.n_batches)
    for c, (_, ids) in zip(one, data.iter_batches(0)):
        x0, _, _ = activations(lm, ids, 0, "R")
        x2, y2, _ = activations(lm, ids, 2, "TC")
        assert torch.equal(c.x, torch.cat([x0, x2, y2], dim=1))
    ranks = [ActivationSource(lm, data, hooks, rank=r, world=2) for r in range(2)]
    got = [chunks(r, data.n_batches) for r in ranks]
    for b, c in enumerate(one):
        for r in range(2):
            g = got[r][b]
            assert (g.row0, g.n, g.owner, g.cursor) == (c.row0, c.n, b % 2, c.cursor)
            assert (g.x is not None) == (b % 2 == r)
            if g.x is not None:
                assert torch.equal(g.x, c.x)
    assert ranks[0].lm_tokens + ranks[1].lm_tokens == single.lm_tokens  # each batch ran once, on one rank


def test_cache_replays_exactly_what_the_lm_computes(setup):
    lm, data = setup
    nb = data.n_batches
    cached = ActivationSource(lm, data, list(Site(1, "R").reads), cache_max_bytes=1 << 30)
    plain = ActivationSource(lm, data, list(Site(1, "R").reads), cache_max_bytes=0)
    assert cached.cache is not None and plain.cache is None
    a = chunks(cached, 3 * nb)  # three epochs: two replayed from the cache
    b = chunks(plain, 3 * nb)
    assert 3 * cached.lm_tokens == plain.lm_tokens  # the LM ran in the first epoch only
    for ca, cb in zip(a, b):
        assert ca.cursor == cb.cursor
        assert torch.equal(ca.x, cb.x)
    assert [c.cursor["epoch"] for c in a] == [0] * nb + [1] * nb + [2] * nb


def test_cursor_regenerates_a_chunk(setup):
    lm, data = setup
    src = ActivationSource(lm, data, list(Site(2, "M").reads), cache_max_bytes=0)
    got = chunks(src, data.n_batches + 3)
    target = got[-2]
    again = ActivationSource(lm, data, list(Site(2, "M").reads))
    again.load_state_dict(target.cursor)
    first = next(iter(again))
    assert first.cursor == target.cursor and first.row0 == target.row0 and torch.equal(first.x, target.x)


def test_cache_is_skipped_when_too_large(setup):
    lm, data = setup
    src = ActivationSource(lm, data, list(Site(1, "TC").reads), cache_max_bytes=10)
    assert src.cache is None and src.row_bytes() == 2 * 32 * 4


def test_finite_epochs(setup):
    lm, data = setup
    src = ActivationSource(lm, data, list(Site(0, "R").reads), epochs=1)
    assert len(list(src)) == data.n_batches
