"""The activation source: LM batches in, chunks of non-special-token activations out.

``ActivationSource`` walks the run's one global sequence of LM batches (``ContextData``: epochs of
batches, forever or for ``epochs``) and yields one ``Chunk`` per LM batch. A chunk's rows are the
batch's non-special tokens, in row-major order, and each row holds the activations of every hook
point the run reads (``hooks``: TransformerLens names, ``blocks.3.hook_resid_post``, ...), side by
side: ``x [n, len(hooks) * d_model]``. The LM runs once per batch, up to the deepest hook.

Every layout walks the same sequence (docs/method.md sec. 8). LM batch ``b`` is dealt to rank
``b % world``: only that rank runs the LM on it (``chunk.x``); on the other ranks the chunk has
``x = None`` but still says where its rows sit in the global row stream (``row0``, ``n``, ``owner``).
``n`` is a function of the token ids alone (the special-token mask), so every rank knows the whole
stream's row layout without running the LM or communicating. With the activation cache the deal
uses the batch's id (the same contexts in every epoch), so a rank replays its own batches.

Position: ``(epoch, batch, row)``, the next batch and the global index of its first row; a chunk's
``cursor`` regenerates it exactly, which ``ActivationBuffer`` uses on ``--resume``.

Activation cache: when the training split of an in-memory dataset is small enough
(``cache_max_bytes``), each LM batch's activations are kept after the first epoch and replayed in
later epochs instead of running the LM again. A batch always holds the same contexts, so a cached
chunk equals a recomputed one (after a resume the cache refills lazily from the LM).
"""
from __future__ import annotations

import time
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from torch import Tensor

from .buffer import Chunk
from .lm import LoadedModel, hook_activations, special_mask
from .text import ContextData


class ActivationSource:
    """Deterministic, resumable stream of activation chunks (see the module docstring).

    Args:
        lm: the loaded model. data: the contexts. hooks: TransformerLens hook names, the column
            blocks of every row in this order.
        store_dtype: dtype of the yielded rows (and of the cache).
        cache_max_bytes: cache activations across epochs when they fit (0: never).
        epochs: stop after this many epochs (None: cycle forever; the trainer stops by steps).
        special_ids: token ids never trained on (default: the model's plus the packing's).
        rank, world: this process runs the LM on the batches dealt to ``rank`` out of ``world``.
    """

    def __init__(
        self,
        lm: LoadedModel,
        data: ContextData,
        hooks: Sequence[str],
        *,
        store_dtype: torch.dtype = torch.float32,
        cache_max_bytes: int = 0,
        epochs: Optional[int] = None,
        special_ids: Optional[Sequence[int]] = None,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if not hooks:
            raise ValueError("hooks: expected at least one hook point")
        self.lm, self.data, self.hooks = lm, data, list(hooks)
        self.rank, self.world = rank, world
        self.store_dtype = store_dtype
        self.epochs = epochs
        self.special_ids = sorted(set(special_ids if special_ids is not None else lm.special_ids) | set(data.special_ids))
        self._special = torch.tensor(self.special_ids, dtype=torch.int64)
        self.epoch, self.batch, self.row = 0, 0, 0
        self.cache: Optional[Dict[int, Tensor]] = None
        self.lm_tokens = 0  # tokens pushed through the LM by this rank (throughput statistics)
        self.lm_seconds = 0.0  # time spent in LM forwards by this rank
        if cache_max_bytes > 0 and data.in_memory:
            need = self.train_rows() * self.row_bytes()
            if need <= cache_max_bytes:
                self.cache = {}

    @property
    def width(self) -> int:
        return len(self.hooks) * self.lm.d_model

    def row_bytes(self) -> int:
        return torch.empty((), dtype=self.store_dtype).element_size() * self.width

    def train_rows(self) -> int:
        """Non-special tokens in one epoch of training data (in-memory datasets)."""
        t = self.data.train_tokens()
        if t is None:
            raise ValueError("train_rows: only known for in-memory datasets")
        return int((~special_mask(t, self.special_ids)).sum())

    def owner(self, key: Optional[int], batch: int) -> int:
        """The rank that runs the LM on the ``batch``-th LM batch of an epoch (content id ``key``)."""
        return (key if self.cache is not None and key is not None else batch) % self.world

    # ------------------------------------------------------------------ state

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "row": self.row}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.epoch, self.batch, self.row = int(sd["epoch"]), int(sd["batch"]), int(sd.get("row", 0))

    # ------------------------------------------------------------------ iteration

    def compute(self, input_ids: Tensor) -> Tensor:
        """``[n, len(hooks) * d]``: the hooks' activations of the non-special tokens of one LM batch."""
        t0 = time.perf_counter()
        acts, _ = hook_activations(self.lm, input_ids, self.hooks, special_ids=self.special_ids)
        self.lm_tokens += input_ids.numel()
        cols: List[Tensor] = [acts[h].to(self.store_dtype) for h in self.hooks]
        x = cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)
        self.lm_seconds += time.perf_counter() - t0
        return x

    def __iter__(self) -> Iterator[Chunk]:
        while self.epochs is None or self.epoch < self.epochs:
            for key, input_ids in self.data.iter_batches(self.epoch, self.batch):
                n = int((~torch.isin(input_ids, self._special)).sum())
                owner = self.owner(key, self.batch)
                cursor = self.state_dict()
                x = None
                if owner == self.rank:
                    if self.cache is not None and key in self.cache:
                        x = self.cache[key]
                    else:
                        x = self.compute(input_ids)
                        if self.cache is not None and key is not None:
                            self.cache[key] = x
                self.batch += 1
                self.row += n
                yield Chunk(x, None, cursor, row0=cursor["row"], n=n, owner=owner)
            if self.batch == 0:
                raise ValueError(f"--dataset {self.data.docs.name!r}: no training contexts")
            self.epoch, self.batch = self.epoch + 1, 0
