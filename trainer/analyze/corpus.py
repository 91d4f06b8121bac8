"""The contexts an analysis or an evaluation runs on, chosen the way the run chose its held-out split.

``trainer.run`` holds out context ``i`` of the packed stream when ``i % eval_every == eval_every - 1``,
for the first ``ceil(eval_tokens / context_len)`` such contexts. Given a run's settings
(``train_config.json``) and nothing else, ``held_out_contexts`` returns exactly those contexts; with
more ``tokens`` the same rule continues past the run's split (those later contexts were trained on);
with another ``dataset`` or ``context_len`` the rule picks contexts of that stream. With ``trained`` it
picks, by the same rule, the context just before each held-out one (``i % eval_every == 0``), which the
run trained on: an SAE's EV there against its held-out EV is how much it fits its training text only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from torch import Tensor

from ..data.text import ContextData, load_documents

# what a run folder without train_config.json (a released checkpoint) is analysed on by default
FALLBACK = {"dataset": "pydoc", "context_len": 1024, "eval_every": 10, "eval_tokens": 8192, "seed": 42,
            "use_bos": True, "lm_batch_size": 4, "split": "train", "text_column": "text"}


@dataclass
class Corpus:
    contexts: Tensor  # [n, context_len] token ids
    special_ids: List[int]
    info: Dict[str, Any]


def held_out_contexts(settings: Dict[str, Any], lm, *, dataset: Optional[str] = None, tokens: Optional[int] = None,
                      context_len: Optional[int] = None, dataset_config: Optional[str] = None,
                      split: Optional[str] = None, text_column: Optional[str] = None,
                      trained: bool = False) -> Corpus:
    s = dict(FALLBACK)
    s.update({k: v for k, v in settings.items() if v is not None})
    own_data = dataset is None or dataset == s["dataset"]
    ds = s["dataset"] if dataset is None else dataset
    T = int(context_len or s["context_len"])
    n_tok = int(tokens or s["eval_tokens"])
    if T < 2:
        raise ValueError(f"--context-len: expected at least 2, got {T}")
    if n_tok < 1:
        raise ValueError(f"--tokens: expected a positive number, got {n_tok}")
    run_layout = own_data and T == int(s["context_len"])  # the run's own stream of contexts
    if trained and not (run_layout and settings):
        raise ValueError("--training-contexts: expected the run's own data and context length (no --dataset, "
                         "--context-len other than the run's; a released checkpoint has no training text)")
    max_pos = getattr(getattr(lm.model, "config", None), "max_position_embeddings", None)
    if isinstance(max_pos, int) and T > max_pos:
        raise ValueError(f"--context-len {T}: the model supports at most {max_pos} positions")
    docs = load_documents(ds, split=split or (s["split"] if own_data else "train"),
                          text_column=text_column or (s["text_column"] if own_data else "text"),
                          dataset_config=dataset_config if dataset_config is not None else
                          (s.get("dataset_config") if own_data else None),
                          streaming=s.get("streaming") if own_data else None)
    n_ctx = max(1, math.ceil(n_tok / T))
    data = ContextData(docs, lm.tokenizer, T, int(s["lm_batch_size"]), eval_every=int(s["eval_every"]),
                       eval_contexts=n_ctx, seed=int(s["seed"]), use_bos=bool(s["use_bos"]),
                       eval_phase=0 if trained else None)
    special = sorted(set(lm.special_ids) | set(data.special_ids))
    same = (run_layout and not trained
            and n_ctx <= math.ceil(int(s["eval_tokens"]) / int(s["context_len"])))
    if trained:
        rule = (f"every {s['eval_every']}th context of the packed stream starting at 0, the first {len(data.eval)}: "
                "the context before each held-out one, trained on")
    else:
        rule = (f"every {s['eval_every']}th context of the packed stream, the first {len(data.eval)}"
                + (" (the run's held-out split)" if same and settings else ""))
    contexts = data.eval
    if len(contexts) < n_ctx:
        rule += f"; the data holds only {len(contexts)} such contexts"
    n_special = int(sum(int((contexts == i).sum()) for i in special))
    return Corpus(contexts, special, {
        "dataset": ds, "n_contexts": int(len(contexts)), "context_len": T,
        "tokens": int(contexts.numel()) - n_special, "rule": rule, "held_out": bool(same and settings),
        "training_contexts": bool(trained),
    })
