"""Checks that fail a run in seconds, before the model loads, instead of minutes (or a traceback) later.

* ``offline_if_unreachable``: when the model or the dataset is a Hub name and the Hub cannot be reached,
  switch the Hugging Face libraries to their offline mode (the local cache only) for the run, so that a
  misspelt name fails at once instead of after ~30-50 s of retries.
* ``check_buffer_memory``: this rank's share of the activation buffer against the free memory of its device.
* ``check_sae_memory``: the SAEs' state (fp32 weights, gradients and Adam moments: 16 bytes per
  parameter), their step activations, the LM's weights and the activation buffer against the free
  memory of the device they go to: ``--expansion 100000`` is refused with its size, not an allocator
  traceback after the model has loaded.
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import threading
from typing import Callable, Dict, List, Optional, Sequence
from urllib.parse import urlparse

import torch

from .data.lm import DEFAULT_MODEL


def _needs_hub(name: Optional[str], builtin: str) -> bool:
    """A name that only the Hub can resolve: not the built-in default, not an existing path, and not a
    path that is missing (those are missing-file errors)."""
    from .data.text import looks_like_path

    if name in (builtin, "", None) or os.path.exists(str(name)):
        return False
    return not (looks_like_path(str(name)) or str(name).endswith(".gguf"))


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub's endpoint (``HF_ENDPOINT``) opens within ``timeout_s``
    (name resolution included: it runs on a thread that is abandoned at the deadline)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    u = urlparse(endpoint)
    host, port = u.hostname or "huggingface.co", u.port or (80 if u.scheme == "http" else 443)
    ok: List[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout_s + 0.5)
    return bool(ok)


def _set_offline(value: bool) -> None:
    """The environment variable for libraries imported later (they read it at import), and the constants
    of those already imported; nothing is imported here (``datasets`` alone takes seconds)."""
    os.environ["HF_HUB_OFFLINE"] = "1" if value else "0"
    hc = sys.modules.get("huggingface_hub.constants")
    if hc is not None:
        hc.HF_HUB_OFFLINE = value
    dc = sys.modules.get("datasets.config")
    if dc is not None:
        dc.HF_HUB_OFFLINE = value
        if hasattr(dc, "HF_DATASETS_OFFLINE"):
            dc.HF_DATASETS_OFFLINE = value


def hub_offline() -> bool:
    """Whether the Hugging Face libraries are in their offline mode (``HF_HUB_OFFLINE``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def offline_if_unreachable(model: str, dataset: str, log: Callable[[str], None]) -> Callable[[], None]:
    """Offline mode for this run when it needs the Hub and the Hub is unreachable; returns the undo."""
    needs = _needs_hub(model, DEFAULT_MODEL) or _needs_hub(dataset, "pydoc")
    if not needs or hub_offline():
        return lambda: None
    if hub_reachable():
        return lambda: None
    before = os.environ.get("HF_HUB_OFFLINE")
    _set_offline(True)
    log(f"the Hugging Face Hub ({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}) cannot be reached: "
        "Hub names are looked up in the local cache only (HF_HUB_OFFLINE=1)")

    def undo() -> None:
        _set_offline(False)
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before

    return undo


# ----------------------------------------------------------------------------------- memory


def available_bytes(device: torch.device) -> Optional[int]:
    """Free memory on ``device`` (CUDA: free device memory; CPU: the kernel's MemAvailable), or None."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def model_weight_bytes(name: str, elem: int) -> int:
    """Bytes of the LM's weights at ``elem`` bytes per parameter, from its configuration (Llama-like
    fields; a .gguf file: its size, a lower bound); 0 when the configuration does not say."""
    from .data.lm import EMBEDDED_GGUF, embedded_model_folder

    try:
        if name in (DEFAULT_MODEL, "", None):
            return os.path.getsize(os.path.join(embedded_model_folder(), EMBEDDED_GGUF))
        if os.path.isfile(name):
            return os.path.getsize(name)
        if os.path.isdir(name):
            cfg = json.loads(open(os.path.join(name, "config.json")).read())
        else:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(name).to_dict()
    except Exception:  # the configuration was read before (model_facts): an estimate is optional
        return 0
    cfg = cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg
    try:
        d, n_layers, ff = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["intermediate_size"])
        vocab = int(cfg["vocab_size"])
        heads = int(cfg.get("num_attention_heads") or 1)
        kv = int(cfg.get("num_key_value_heads") or heads)
    except (KeyError, TypeError, ValueError):
        return 0
    head_dim = int(cfg.get("head_dim") or d // heads)
    attn = d * heads * head_dim * 2 + d * kv * head_dim * 2
    params = n_layers * (attn + 3 * d * ff + 2 * d) + vocab * d * (1 if cfg.get("tie_word_embeddings") else 2) + d
    return params * elem


def sae_bytes(expansions: Sequence[int], d_model: int, *, rank: int, tp: int, dp: int, batch_size: int,
              bf16: bool) -> Dict[str, float]:
    """What this rank's SAEs need: ``state`` (fp32 weights, gradients and Adam moments, plus bf16
    copies in bf16 runs), ``activations`` (the dense pre-activations of the largest member's step),
    ``params`` and ``members`` (on this rank)."""
    from .parallel import place_members

    placement = place_members(list(expansions), dp, batch_size)
    group = rank // tp
    per_param = 16 + (4 if bf16 else 0)
    state = act = params = 0.0
    n = 0
    for e, groups in zip(expansions, placement):
        if group not in groups:
            continue
        d_sae = e * d_model / tp
        p = 2 * d_model * d_sae + d_sae + d_model
        params += p
        state += p * per_param
        rows = math.ceil(batch_size / len(groups))
        act = max(act, rows * d_sae * 4 * 2)
        n += 1
    return {"state": state, "activations": act, "params": params, "members": n}


def check_sae_memory(*, expansions: Sequence[int], d_model: int, rank: int, tp: int, dp: int, batch_size: int,
                     bf16: bool, device: torch.device, model_bytes: int, buffer_bytes: int,
                     buffer_device: torch.device, sharing: int = 1,
                     free_of: Callable[[torch.device], Optional[int]] = available_bytes) -> None:
    """Refuses, naming --expansion, SAEs that with the model (and the buffer, when it is on the same
    device) need more than 90% of the free memory of ``device``; ``sharing``: ranks sharing the host."""
    need = sae_bytes(expansions, d_model, rank=rank, tp=tp, dp=dp, batch_size=batch_size, bf16=bf16)
    sae = need["state"] + need["activations"]
    if sae == 0:
        return
    same = buffer_device.type == device.type and (device.type == "cpu" or buffer_device == device)
    total = sae + model_bytes + (buffer_bytes if same else 0)
    free = free_of(device)
    share = sharing if device.type == "cpu" else 1
    if free is None or total * share <= 0.9 * free:
        return
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    on = f"{device}" + (f" (shared by {share} ranks)" if share > 1 else "")
    raise ValueError(
        f"--expansion: the {'SAEs' if need['members'] > 1 else 'SAE'} of this rank "
        f"{'need' if need['members'] > 1 else 'needs'} {gib(sae)} "
        f"({need['members']} SAE{'s' if need['members'] > 1 else ''}, {need['params'] / 1e6:,.1f}M parameters "
        f"{'on this rank ' if tp > 1 or dp > 1 else ''}x {16 + (4 if bf16 else 0)} bytes for weights, gradients "
        f"and Adam moments: {gib(need['state'])}; step activations about {gib(need['activations'])}), besides "
        f"the model ({gib(model_bytes)}){' and the activation buffer (' + gib(buffer_bytes) + ')' if same else ''}: "
        f"{gib(total)} in all, more than the {gib(free)} free on {on}; lower --expansion, train fewer SAEs per "
        "run, or split each SAE over more GPUs with --tp (docs/parallelism.md)"
    )


def check_buffer_memory(cfg, n_hooks: int, d_model: int, elem: int, world: int,
                        device: torch.device) -> int:
    """Bytes of this rank's activation buffer; refuses (naming --buffer-tokens) what does not fit."""
    rows = cfg.buffer_tokens if world == 1 else -(-cfg.buffer_tokens // world) + 2 * cfg.batch_size
    need = rows * n_hooks * d_model * elem
    free = available_bytes(device)
    # host memory is shared by the ranks of a node
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1) if device.type == "cpu" else 1
    if free is not None and need * sharing > 0.9 * free:
        per = f" / {world} ranks" if world > 1 else ""
        on = f"{device}" + (f" (shared by {sharing} ranks)" if sharing > 1 else "")
        raise ValueError(
            f"--buffer-tokens: the activation buffer needs {need / 2**30:.2f} GiB on this rank "
            f"({cfg.buffer_tokens:,} tokens{per} x {n_hooks} hook point column blocks x d_model {d_model} x "
            f"{elem} bytes), more than the {free / 2**30:.2f} GiB free on {on}; lower --buffer-tokens "
            "or train fewer hook points per run"
        )
    return need


def check_context_len(cfg) -> None:
    """``--context-len`` within the model's ``max_position_embeddings`` (from its configuration, before the
    weights load): a longer context runs the model outside what it was built for, and a huge one would
    end in a MemoryError after minutes."""
    from .data.lm import max_positions

    limit = max_positions(cfg.model)
    if limit is not None and cfg.context_len > limit:
        raise ValueError(f"--context-len: expected at most {limit} tokens (the model's max_position_embeddings), "
                         f"got {cfg.context_len}")
