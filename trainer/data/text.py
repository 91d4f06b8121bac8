"""Text in, fixed-length token contexts out: the dataset, tokenisation, BOS handling, held-out split.

* ``load_documents``: the CPython docs in ``pydoc_data.topics`` (the default, offline), a local file
  or folder (txt, json, jsonl, parquet, csv), or a Hugging Face Hub dataset (streamed by default).
* ``ContextData``: documents are tokenised without special tokens and concatenated with an EOS
  separator; every context starts with BOS and holds ``context_len - 1`` further tokens; the last
  context is padded. Special tokens are never trained on (the producer drops them).
* Held-out split (deterministic, independent of the seed): context ``i`` of the stream goes to
  evaluation when ``i % eval_every == eval_every - 1``, for the first ``eval_contexts`` such ``i``.
  Training never sees those contexts.
* Training order: in-memory datasets are shuffled once by context (seeded), cut into LM batches, and
  every epoch after the first visits the batches in a new seeded order; streamed datasets are read
  in order, epoch after epoch. Either way the order is a pure function of ``(seed, epoch, batch)``,
  which is what makes ``--resume`` exact.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

DEFAULT_DATASET = "pydoc"
LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """A dataset that cannot be read, or a setting it cannot satisfy."""


@dataclass
class DocumentSource:
    """A re-iterable, deterministic sequence of text documents."""

    name: str
    make_iter: Callable[[], Iterator[str]]
    in_memory: bool  # small enough to tokenise up front (pydoc, non-streamed datasets)

    def __iter__(self) -> Iterator[str]:
        return self.make_iter()


def pydoc_documents() -> DocumentSource:
    """English text of CPython's documentation topics (~113k tokens with SmolLM2's tokenizer)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    return DocumentSource("pydoc_data.topics", lambda: (topics[k] for k in keys), in_memory=True)


def _column_iter(ds, text_column: str, name: str) -> Iterator[str]:
    for row in ds:
        if text_column not in row:
            raise DataError(f"--text-column: {name} has no column {text_column!r} (columns: {sorted(row)})")
        text = row[text_column]
        if isinstance(text, str) and text:
            yield text


def looks_like_path(name: str) -> bool:
    """A name that can only be a local path (not a Hub name such as ``org/name``): it starts with
    ``.``, ``/`` or ``~``, has more than one ``/``, or ends with a data file extension."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1
            or os.path.splitext(name)[1].lower() in LOCAL_BUILDERS)


def load_documents(
    dataset: str = DEFAULT_DATASET,
    *,
    split: str = "train",
    text_column: str = "text",
    dataset_config: Optional[str] = None,
    streaming: Optional[bool] = None,
) -> DocumentSource:
    """Documents of ``dataset``: ``"pydoc"``, a local file / folder, or a Hub dataset name.

    ``streaming=None`` streams Hub datasets and reads local files into memory. Raises ``DataError``
    naming ``--dataset`` when the data cannot be opened or has no usable text.
    """
    if dataset in (DEFAULT_DATASET, "", None):
        return pydoc_documents()
    # the local checks come before the (slow) import of datasets: a missing file fails at once
    local = os.path.exists(dataset)
    if not local and looks_like_path(dataset):
        raise DataError(f"--dataset {dataset!r}: no such file or folder ({os.path.abspath(os.path.expanduser(dataset))}); "
                        "a local dataset is a txt/json/jsonl/parquet/csv file or a folder of them, a Hub dataset "
                        "a name such as 'org/name'")
    if local:
        files = sorted(glob.glob(os.path.join(dataset, "**", "*"), recursive=True)) if os.path.isdir(dataset) else [dataset]
        files = [f for f in files if os.path.isfile(f) and os.path.splitext(f)[1].lower() in LOCAL_BUILDERS]
        exts = sorted({os.path.splitext(f)[1].lower() for f in files})
        if not files:
            raise DataError(
                f"--dataset {dataset!r}: no readable files (expected one of {', '.join(LOCAL_BUILDERS)})"
            )
        builders = {LOCAL_BUILDERS[e] for e in exts}
        if len(builders) > 1:
            raise DataError(f"--dataset {dataset!r}: mixed file types {exts}; use one format per dataset")
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - listed as a dependency
        raise DataError(f"--dataset {dataset!r}: the 'datasets' package is needed ({e})") from None
    if streaming is None:
        streaming = not local
    if local:
        builder = builders.pop()
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}

        def open_ds():
            return datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming, **kwargs)
    else:
        def open_ds():
            return datasets.load_dataset(dataset, dataset_config, split=split, streaming=streaming)
    try:
        ds = open_ds()
        first = next(iter(ds))
    except StopIteration:
        raise DataError(f"--dataset {dataset!r}: the dataset is empty") from None
    except Exception as e:  # datasets raises many types: FileNotFoundError, DatasetNotFoundError, ArrowInvalid, ...
        msg = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"--dataset {dataset!r}: could not read it ({type(e).__name__}: {msg})") from None
    if text_column not in first:
        raise DataError(f"--text-column: {dataset!r} has no column {text_column!r} (columns: {sorted(first)})")
    cache = {"ds": ds}

    def make_iter() -> Iterator[str]:
        d = cache.pop("ds", None) or open_ds()  # reuse the opened dataset once, reopen for later epochs
        return _column_iter(d, text_column, dataset)

    return DocumentSource(dataset, make_iter, in_memory=not streaming)


# ----------------------------------------------------------------------------------- tokenisation


@dataclass
class TokenIds:
    """The special token ids the packing uses."""

    bos: Optional[int]
    sep: Optional[int]  # between documents: EOS, else BOS
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer, use_bos: bool = True) -> "TokenIds":
        bos = getattr(tokenizer, "bos_token_id", None) if use_bos else None
        eos = getattr(tokenizer, "eos_token_id", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        sep = eos if eos is not None else getattr(tokenizer, "bos_token_id", None)
        if pad is None:
            pad = eos if eos is not None else (bos if bos is not None else 0)
        return cls(bos=bos, sep=sep, pad=int(pad))


def iter_contexts(
    docs: Iterable[str], tokenizer, context_len: int, ids: TokenIds, doc_batch: int = 64
) -> Iterator[List[int]]:
    """Pack the documents into contexts of exactly ``context_len`` token ids (BOS first)."""
    body = context_len - (1 if ids.bos is not None else 0)
    if body < 1:
        raise DataError(f"--context-len: expected at least 2, got {context_len}")
    pending: List[int] = []

    def emit(chunk: List[int]) -> List[int]:
        ctx = ([ids.bos] if ids.bos is not None else []) + chunk
        return ctx + [ids.pad] * (context_len - len(ctx))

    batch: List[str] = []

    def flush(texts: List[str]) -> Iterator[List[int]]:
        nonlocal pending
        enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for toks in enc:
            pending.extend(toks)
            if ids.sep is not None:
                pending.append(ids.sep)
            while len(pending) >= body:
                yield emit(pending[:body])
                pending = pending[body:]

    for text in docs:
        batch.append(text)
        if len(batch) >= doc_batch:
            yield from flush(batch)
            batch = []
    if batch:
        yield from flush(batch)
    if pending:
        yield emit(pending)


class ContextData:
    """Held-out evaluation contexts and a deterministic, resumable stream of training LM batches.

    Args:
        docs: the documents. tokenizer: a Hugging Face tokenizer.
        context_len: tokens per context (BOS included). lm_batch_size: contexts per LM forward.
        eval_every, eval_contexts: the held-out rule (see the module docstring).
        seed: shuffles in-memory training contexts and the batch order of later epochs.
    """

    def __init__(
        self,
        docs: DocumentSource,
        tokenizer,
        context_len: int,
        lm_batch_size: int,
        *,
        eval_every: int = 10,
        eval_contexts: int = 16,
        seed: int = 42,
        use_bos: bool = True,
        eval_phase: Optional[int] = None,
    ) -> None:
        if eval_every < 2:
            raise DataError(f"--eval-every: expected >= 2, got {eval_every}")
        # which residue of i % eval_every is held out: eval_every - 1 (the run's rule); another phase picks
        # contexts the run trained on, e.g. to compare an SAE's fit on them with its held-out one
        self.eval_phase = eval_every - 1 if eval_phase is None else eval_phase
        if not 0 <= self.eval_phase < eval_every:
            raise DataError(f"eval_phase: expected 0 <= eval_phase < eval_every = {eval_every}, got {eval_phase}")
        self.docs, self.tokenizer = docs, tokenizer
        self.context_len, self.lm_batch_size = context_len, lm_batch_size
        self.eval_every, self.n_eval_max, self.seed = eval_every, eval_contexts, seed
        self.ids = TokenIds.from_tokenizer(tokenizer, use_bos)
        self.in_memory = docs.in_memory
        self._train: Optional[Tensor] = None
        self._order: Optional[Tensor] = None
        if self.in_memory:
            # one small tensor per context: a list of Python int lists would take ~30x the memory
            all_ctx = [torch.tensor(c, dtype=torch.int64) for c in iter_contexts(docs, tokenizer, context_len, self.ids)]
            if not all_ctx:
                raise DataError(f"--dataset {docs.name!r}: no text after tokenisation")
            t = torch.stack(all_ctx)
            del all_ctx
            is_eval = torch.tensor([self._is_eval(i) for i in range(len(t))], dtype=torch.bool)
            self.eval = t[is_eval]
            self._train = t[~is_eval]
            if len(self._train) == 0:
                raise DataError(f"--dataset {docs.name!r}: too small ({len(t)} contexts) to hold out an eval split")
            g = torch.Generator().manual_seed(seed)
            self._order = torch.randperm(len(self._train), generator=g)
        else:
            ev: List[List[int]] = []
            limit = eval_every * eval_contexts
            for i, ctx in enumerate(iter_contexts(docs, tokenizer, context_len, self.ids)):
                if i >= limit:
                    break
                if self._is_eval(i):
                    ev.append(ctx)
            self.eval = torch.tensor(ev, dtype=torch.int64).reshape(-1, context_len)
        if len(self.eval) == 0:
            raise DataError(f"--dataset {docs.name!r}: no held-out context to evaluate on: every {eval_every}-th "
                            f"{context_len}-token context is held out (--eval-every), and the text makes fewer; give "
                            "more text, or a smaller --eval-every or --context-len")

    def _is_eval(self, i: int) -> bool:
        return i % self.eval_every == self.eval_phase and i // self.eval_every < self.n_eval_max

    @property
    def special_ids(self) -> List[int]:
        return sorted({i for i in (self.ids.bos, self.ids.sep, self.ids.pad) if i is not None})

    @property
    def n_train_contexts(self) -> Optional[int]:
        return None if self._train is None else len(self._train)

    @property
    def n_batches(self) -> Optional[int]:
        """LM batches per epoch (None when streaming: unknown until the stream ends)."""
        n = self.n_train_contexts
        return None if n is None else -(-n // self.lm_batch_size)

    def train_tokens(self) -> Optional[Tensor]:
        """All training contexts (in-memory datasets only), e.g. to count non-special tokens."""
        return self._train

    def batch_order(self, epoch: int) -> List[int]:
        n = self.n_batches or 0
        if epoch == 0:
            return list(range(n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=g).tolist()

    def batch(self, b: int) -> Tensor:
        """In-memory LM batch ``b`` (a fixed set of contexts, the same in every epoch)."""
        assert self._train is not None and self._order is not None
        idx = self._order[b * self.lm_batch_size : (b + 1) * self.lm_batch_size]
        return self._train[idx]

    def iter_batches(self, epoch: int, start: int = 0) -> Iterator[Tuple[int, Tensor]]:
        """``(batch_key, input_ids [b, context_len])`` of ``epoch`` from its ``start``-th batch on.

        ``batch_key`` identifies the batch's contents across epochs (the activation cache uses it):
        the batch index for in-memory data, None when streaming.
        """
        if self.in_memory:
            order = self.batch_order(epoch)
            for b in order[start:]:
                yield b, self.batch(b)
            return
        buf: List[List[int]] = []
        n_done = 0
        for i, ctx in enumerate(iter_contexts(self.docs, self.tokenizer, self.context_len, self.ids)):
            if self._is_eval(i):
                continue
            buf.append(ctx)
            if len(buf) == self.lm_batch_size:
                if n_done >= start:
                    yield None, torch.tensor(buf, dtype=torch.int64)
                n_done += 1
                buf = []
        if buf and n_done >= start:
            yield None, torch.tensor(buf, dtype=torch.int64)
