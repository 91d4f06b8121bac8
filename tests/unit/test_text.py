"""Documents, packing into contexts (BOS, separators, padding), held-out split, batch order."""
import json

import pytest
import torch

from trainer.data import ContextData, DataError, DocumentSource, TokenIds, iter_contexts, load_documents
from trainer.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def docs_of(texts, in_memory=True):
    return DocumentSource("mem", lambda: iter(list(texts)), in_memory=in_memory)


def test_pydoc_default_is_deterministic():
    a, b = list(load_documents()), list(load_documents())
    assert a == b and len(a) > 50 and all(isinstance(t, str) and t for t in a)


def test_packing_bos_separator_and_padding(tok):
    ids = TokenIds.from_tokenizer(tok)
    texts = ["abc", "defgh", "ij"]
    ctxs = list(iter_contexts(texts, tok, 5, ids))
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    flat = [t for c in ctxs for t in c[1:]]
    assert all(len(c) == 5 and c[0] == bos for c in ctxs)
    stream = tok("abc", add_special_tokens=False)["input_ids"] + [eos]
    stream += tok("defgh", add_special_tokens=False)["input_ids"] + [eos]
    stream += tok("ij", add_special_tokens=False)["input_ids"] + [eos]
    assert flat[: len(stream)] == stream and all(t == pad for t in flat[len(stream):])
    no_bos = list(iter_contexts(texts, tok, 5, TokenIds.from_tokenizer(tok, use_bos=False)))
    assert no_bos[0][0] != bos and len(no_bos) <= len(ctxs)


def test_held_out_split_is_disjoint_and_deterministic(tok):
    texts = [f"document number {i} " * (3 + i % 5) for i in range(60)]
    d1 = ContextData(docs_of(texts), tok, 32, 4, eval_every=5, eval_contexts=6, seed=1)
    d2 = ContextData(docs_of(texts), tok, 32, 4, eval_every=5, eval_contexts=6, seed=2)
    all_ctx = torch.tensor(list(iter_contexts(texts, tok, 32, d1.ids)))
    assert torch.equal(d1.eval, d2.eval)  # the split does not depend on the seed
    assert torch.equal(d1.eval, all_ctx[[4, 9, 14, 19, 24, 29]])
    train = d1.train_tokens()
    assert len(train) + len(d1.eval) == len(all_ctx)
    ev = {tuple(r) for r in d1.eval.tolist()}
    assert not ev & {tuple(r) for r in train.tolist()}


def test_batch_order_epochs_and_resume(tok):
    texts = [f"text {i} " * 9 for i in range(50)]
    data = ContextData(docs_of(texts), tok, 16, 3, eval_every=10, eval_contexts=2, seed=7)
    n = data.n_batches
    e0 = [k for k, _ in data.iter_batches(0)]
    e1 = [k for k, _ in data.iter_batches(1)]
    assert e0 == list(range(n)) and sorted(e1) == e0 and e1 != e0
    # every training context once per epoch; a batch holds the same contexts in every epoch
    seen = torch.cat([b for _, b in data.iter_batches(1)])
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, data.train_tokens().tolist()))
    assert torch.equal(dict(data.iter_batches(1))[3], data.batch(3))
    assert [k for k, _ in data.iter_batches(1, start=4)] == e1[4:]


def test_streaming_matches_in_memory(tok):
    texts = [f"stream {i} " * (2 + i % 4) for i in range(40)]
    mem = ContextData(docs_of(texts), tok, 24, 4, eval_every=4, eval_contexts=3)
    st = ContextData(docs_of(texts, in_memory=False), tok, 24, 4, eval_every=4, eval_contexts=3)
    assert torch.equal(mem.eval, st.eval) and st.n_batches is None
    streamed = torch.cat([b for _, b in st.iter_batches(0)])
    assert sorted(map(tuple, streamed.tolist())) == sorted(map(tuple, mem.train_tokens().tolist()))
    tail = torch.cat([b for _, b in st.iter_batches(0, start=2)])
    assert torch.equal(tail, streamed[8:])


@pytest.mark.parametrize("ext", ["jsonl", "json", "txt", "parquet", "csv"])
def test_local_files(tmp_path, ext, tok):
    rows = [{"text": f"row {i} with some words"} for i in range(12)]
    path = tmp_path / f"data.{ext}"
    if ext == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif ext == "json":
        path.write_text(json.dumps(rows))
    elif ext == "txt":
        path.write_text("\n\n".join(r["text"] for r in rows))
    elif ext == "csv":
        path.write_text("text\n" + "\n".join(r["text"] for r in rows) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": [r["text"] for r in rows]}), str(path))
    docs = load_documents(str(path))
    got = [t.strip() for t in docs]
    assert got == [r["text"] for r in rows]
    assert [t.strip() for t in docs] == got  # re-iterable (epochs)
    assert docs.in_memory
    assert not load_documents(str(path), streaming=True).in_memory


def test_unreadable_datasets_name_the_flag(tmp_path):
    with pytest.raises(DataError, match="--dataset"):
        load_documents(str(tmp_path))  # a folder without data files
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match="--dataset"):
        load_documents(str(bad))
    good = tmp_path / "g.jsonl"
    good.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match="--text-column"):
        load_documents(str(good))
    with pytest.raises(DataError, match="--dataset"):
        load_documents("./definitely/not/here.jsonl")
