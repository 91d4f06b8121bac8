"""The activation source: LM batches in, chunks of non-special-token activations out.

``ActivationSource`` iterates epochs of ``ContextData`` batches forever (or for ``epochs``), runs
the LM only up to the requested position of layer ``L`` (``trainer.model.activations``), drops
special tokens and yields one ``Chunk`` per LM batch. Its position is ``(epoch, batch)``; a chunk's
``cursor`` regenerates it exactly, which ``ActivationBuffer`` uses on ``--resume``.

Activation cache: when the training split of an in-memory dataset is small enough
(``cache_max_bytes``), each LM batch's activations are kept after the first epoch and replayed in
later epochs instead of running the LM again. A batch always holds the same contexts, so a cached
chunk equals a recomputed one (after a resume the cache refills lazily from the LM).
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .buffer import Chunk
from .data import ContextData
from .model import LoadedModel, activations, special_mask


class ActivationSource:
    """Deterministic, resumable stream of activation chunks (see the module docstring).

    Args:
        lm: the loaded model. data: the contexts. layer, position: where to read.
        store_dtype: dtype of the yielded rows (and of the cache).
        cache_max_bytes: cache activations across epochs when they fit (0: never).
        epochs: stop after this many epochs (None: cycle forever; the trainer stops by steps).
        special_ids: token ids never trained on (default: the model's plus the packing's).
    """

    def __init__(
        self,
        lm: LoadedModel,
        data: ContextData,
        layer: int,
        position: str,
        *,
        store_dtype: torch.dtype = torch.float32,
        cache_max_bytes: int = 0,
        epochs: Optional[int] = None,
        special_ids: Optional[Sequence[int]] = None,
        shard: Tuple[int, int] = (0, 1),
    ) -> None:
        self.lm, self.data, self.layer, self.position = lm, data, layer, position
        self.shard = shard  # (rank, world): this rank runs the LM on LM batches b with b % world == rank
        self.store_dtype = store_dtype
        self.epochs = epochs
        self.special_ids = sorted(set(special_ids if special_ids is not None else lm.special_ids) | set(data.special_ids))
        self.epoch, self.batch = 0, 0
        self.cache: Optional[Dict[int, Tuple[Tensor, Optional[Tensor]]]] = None
        self.lm_tokens = 0  # tokens pushed through the LM (throughput statistics)
        if cache_max_bytes > 0 and data.in_memory:
            need = self.train_rows() * self.row_bytes()
            if need <= cache_max_bytes:
                self.cache = {}

    def row_bytes(self) -> int:
        d = self.lm.d_model
        per = torch.empty((), dtype=self.store_dtype).element_size()
        return per * d * (2 if self.position == "TC" else 1)

    def train_rows(self) -> int:
        """Non-special tokens in one epoch of training data (in-memory datasets)."""
        t = self.data.train_tokens()
        if t is None:
            raise ValueError("train_rows: only known for in-memory datasets")
        return int((~special_mask(t, self.special_ids)).sum())

    # ------------------------------------------------------------------ state

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.epoch, self.batch = int(sd["epoch"]), int(sd["batch"])

    # ------------------------------------------------------------------ iteration

    def compute(self, input_ids: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """Activations of the non-special tokens of one LM batch (masking with ``special_ids``)."""
        x, y, _ = activations(self.lm, input_ids, self.layer, self.position, special_ids=self.special_ids)
        self.lm_tokens += input_ids.numel()
        x = x.to(self.store_dtype)
        y = y.to(self.store_dtype) if y is not None else None
        return x, y

    def __iter__(self) -> Iterator[Chunk]:
        while self.epochs is None or self.epoch < self.epochs:
            for key, input_ids in self.data.iter_batches(self.epoch, self.batch):
                if self.batch % self.shard[1] != self.shard[0]:  # another rank's LM batch
                    self.batch += 1
                    continue
                cursor = {"epoch": self.epoch, "batch": self.batch}
                if self.cache is not None and key in self.cache:
                    x, y = self.cache[key]
                else:
                    x, y = self.compute(input_ids)
                    if self.cache is not None and key is not None:
                        self.cache[key] = (x, y)
                self.batch += 1
                yield Chunk(x, y, cursor)
            if self.batch == 0:
                raise ValueError(f"--dataset {self.data.docs.name!r}: no training contexts")
            self.epoch, self.batch = self.epoch + 1, 0
