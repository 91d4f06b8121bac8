"""The contexts an analysis or an evaluation runs on, chosen the way the run chose its held-out split.

``trainer.run`` holds out context ``i`` of the packed stream when ``i % eval_every == eval_every - 1``,
for the first ``ceil(eval_tokens / context_len)`` such contexts. Given a run's settings
(``train_config.json``) and nothing else, ``held_out_contexts`` returns exactly those contexts; with
more ``tokens`` the same rule continues past the run's split (those later contexts were trained on);
with another ``dataset`` or ``context_len`` the rule picks contexts of that stream. With ``trained`` it
picks, by the same rule, the context just before each held-out one (``i % eval_every == 0``), which the
run trained on: an SAE's EV there against its held-out EV is how much it fits its training text only.

``analysis_contexts`` is what ``python -m trainer.analyze`` reads by default: enough contexts for the
top examples of most latents (``DEFAULT_CONTEXTS``, or the run's held-out split when larger), in
this order: the run's held-out split (never trained on), then the same rule continued past the
split (every ``eval_every``-th context of the stream), then, when the data holds fewer such
contexts, the same rule at the other offsets (``i % eval_every == eval_every - 2``, ..., ``0``). So
``--tokens`` always adds contexts while the data has any. Every token is tagged with the document
it came from (``Corpus.docs``), so that a latent's examples can be spread over documents.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from ..data.text import ContextData, TokenIds, iter_contexts, load_documents

# the default corpus of an analysis: at least this many contexts (128 x 1024 = 131,072 tokens; all of the
# embedded default's CPython docs, ~111 contexts), or the run's held-out split when it is larger
DEFAULT_CONTEXTS = 128

# what a run folder without train_config.json (a released checkpoint) is analysed on by default
FALLBACK = {"dataset": "pydoc", "context_len": 1024, "eval_every": 10, "eval_tokens": 8192, "seed": 42,
            "use_bos": True, "lm_batch_size": 4, "split": "train", "text_column": "text"}


@dataclass
class Corpus:
    contexts: Tensor  # [n, context_len] token ids
    special_ids: List[int]
    info: Dict[str, Any]
    docs: Optional[Tensor] = None  # [n, context_len] int32: the document of every token (analysis_contexts)


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


def _settings(settings: Dict[str, Any]) -> Dict[str, Any]:
    s = dict(FALLBACK)
    s.update({k: v for k, v in settings.items() if v is not None})
    return s


def analysis_contexts(settings: Dict[str, Any], lm, *, dataset: Optional[str] = None, tokens: Optional[int] = None,
                      context_len: Optional[int] = None, dataset_config: Optional[str] = None,
                      split: Optional[str] = None, text_column: Optional[str] = None,
                      held_out_only: bool = False) -> Corpus:
    """The corpus of an analysis (see the module docstring): ``tokens`` (whole contexts; default
    ``max(eval_tokens, DEFAULT_CONTEXTS x context_len)``) picked held-out split first, then by the
    held-out rule continued, then by the same rule at the other offsets; ``held_out_only`` keeps the
    run's held-out split only (at most ``tokens`` of it). ``info["held_out_contexts"]`` counts the
    leading contexts that are the run's held-out split (never trained on)."""
    s = _settings(settings)
    own_data = dataset is None or dataset == s["dataset"]
    ds = s["dataset"] if dataset is None else dataset
    T = int(context_len or s["context_len"])
    E = int(s["eval_every"])
    if T < 2:
        raise ValueError(f"--context-len: expected at least 2, got {T}")
    if tokens is not None and tokens < 1:
        raise ValueError(f"--tokens: expected a positive number, got {tokens}")
    run_layout = bool(settings) and own_data and T == int(s["context_len"])
    n_split = math.ceil(int(s["eval_tokens"]) / int(s["context_len"])) if run_layout else 0
    if held_out_only:
        if not run_layout:
            raise ValueError("--held-out-only: expected the run's own data and context length (no --dataset, "
                             "--context-len other than the run's; a released checkpoint records no held-out split)")
        n_ctx = min(n_split, math.ceil(tokens / T)) if tokens else n_split
    else:
        n_ctx = math.ceil(tokens / T) if tokens else max(math.ceil(int(s["eval_tokens"]) / T), DEFAULT_CONTEXTS)
    max_pos = getattr(getattr(lm.model, "config", None), "max_position_embeddings", None)
    if isinstance(max_pos, int) and T > max_pos:
        raise ValueError(f"--context-len {T}: the model supports at most {max_pos} positions")
    docs = load_documents(ds, split=split or (s["split"] if own_data else "train"),
                          text_column=text_column or (s["text_column"] if own_data else "text"),
                          dataset_config=dataset_config if dataset_config is not None else
                          (s.get("dataset_config") if own_data else None),
                          streaming=s.get("streaming") if own_data else None)
    ids = TokenIds.from_tokenizer(lm.tokenizer, bool(s["use_bos"]))
    first = 1 if ids.bos is not None else 0
    # the stream's first E * n_ctx contexts hold n_ctx at offset E - 1 when the data is that long
    limit = E * (n_split if held_out_only else n_ctx)
    stream: List[List[int]] = []
    doc_start: List[int] = []
    n_doc = 0
    for ctx in iter_contexts(docs, lm.tokenizer, T, ids):
        if len(stream) >= limit:
            break
        stream.append(ctx)
        doc_start.append(n_doc)
        if ids.sep is not None:
            n_doc += sum(1 for t in ctx[first:] if t == ids.sep)
    if not stream:
        raise ValueError(f"--dataset {ds!r}: no text after tokenisation")
    phases = [E - 1] if held_out_only else [E - 1] + list(range(E - 2, -1, -1))
    pick = [i for ph in phases for i in range(ph, len(stream), E)][:n_ctx]
    if not pick:
        raise ValueError(f"--dataset {ds!r}: no context to analyse: every {E}-th {T}-token context is picked "
                         "first, and the text makes fewer; give more text, or a smaller --context-len")
    contexts = torch.tensor([stream[i] for i in pick], dtype=torch.int64)
    # the document of every token: the documents started before the context, plus the separators before it
    sep = torch.zeros_like(contexts, dtype=torch.bool)
    if ids.sep is not None:
        sep[:, first:] = contexts[:, first:] == ids.sep
    before = torch.cumsum(sep.int(), 1) - sep.int()  # separators strictly before each position
    docs_t = (torch.tensor([doc_start[i] for i in pick], dtype=torch.int32)[:, None] + before).to(torch.int32)
    n_held = sum(1 for i in pick if i % E == E - 1 and i // E < n_split)
    special = sorted(set(lm.special_ids) | {i for i in (ids.bos, ids.sep, ids.pad) if i is not None})
    n_special = int(sum(int((contexts == i).sum()) for i in special))
    n_rule = sum(1 for i in pick if i % E == E - 1)
    if n_held == len(pick):
        rule = (f"the run's held-out split: every {E}th context of the packed stream, the first {n_held} "
                "(never trained on)")
    else:
        rule = (f"the run's held-out split first ({n_held} contexts, never trained on), then " if n_held else "") + \
            (f"every {E}th context of the packed stream" + (" continued past the split" if n_held else "")) + \
            (f", then the same rule at the other offsets ({len(pick) - n_rule} contexts)" if len(pick) > n_rule else "") + \
            ("; the run trained on the contexts past its split unless it stopped before reaching them"
             if run_layout else "")
    if len(pick) < n_ctx:
        rule += f"; the data holds only {len(pick)} contexts of {T} tokens"
    used = torch.unique(docs_t[~torch.isin(contexts, torch.tensor(special, dtype=torch.int64))]) if special else \
        torch.unique(docs_t)
    return Corpus(contexts, special, {
        "dataset": ds, "n_contexts": int(len(contexts)), "context_len": T,
        "tokens": int(contexts.numel()) - n_special, "rule": rule,
        "held_out": bool(run_layout and n_held == len(pick) and n_held == n_split),
        "held_out_contexts": int(n_held), "asked_contexts": int(n_ctx), "documents": int(used.numel()),
        "training_contexts": False,
    }, docs=docs_t)
