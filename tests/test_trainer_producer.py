"""ActivationSource: LM batches -> chunks of non-special activations; cache; cursors; epochs."""
import pytest
import torch

from trainer.data import ContextData, DocumentSource
from trainer.model import activations, load_model
from trainer.producer import ActivationSource
from trainer.testing import tiny_llama_folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    lm = load_model(tiny_llama_folder(str(tmp_path_factory.mktemp("prod")), layers=3))
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
    src = ActivationSource(lm, data, 1, position)
    got = chunks(src, 2)
    for c, (key, ids) in zip(got, data.iter_batches(0)):
        keep = ~torch.isin(ids, torch.tensor(src.special_ids))
        x, y, k2 = activations(lm, ids, 1, position, special_ids=src.special_ids)
        assert torch.equal(k2.cpu(), keep) and c.x.shape[0] == int(keep.sum())
        torch.testing.assert_close(c.x, x, rtol=0, atol=0)
        assert (c.y is None) == (position != "TC")


def test_cache_replays_exactly_what_the_lm_computes(setup):
    lm, data = setup
    nb = data.n_batches
    cached = ActivationSource(lm, data, 1, "R", cache_max_bytes=1 << 30)
    plain = ActivationSource(lm, data, 1, "R", cache_max_bytes=0)
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
    src = ActivationSource(lm, data, 2, "M", cache_max_bytes=0)
    got = chunks(src, data.n_batches + 3)
    target = got[-2]
    again = ActivationSource(lm, data, 2, "M")
    again.load_state_dict(target.cursor)
    first = next(iter(again))
    assert first.cursor == target.cursor and torch.equal(first.x, target.x)


def test_cache_is_skipped_when_too_large(setup):
    lm, data = setup
    src = ActivationSource(lm, data, 1, "TC", cache_max_bytes=10)
    assert src.cache is None and src.row_bytes() == 2 * 32 * 4


def test_finite_epochs(setup):
    lm, data = setup
    src = ActivationSource(lm, data, 0, "R", epochs=1)
    assert len(list(src)) == data.n_batches
