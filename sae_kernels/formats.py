"""Checkpoint formats: our own, the released Llama Scope layout, SAELens and EleutherAI sparsify.

Readers and writers work on an SAE's state, never on the module (``TopKSAE`` builds itself from
what a reader returns, ``TopKSAE.from_state``, and hands its state to a writer):

* ``read_sae`` / ``read_llama_scope`` / ``read_saelens`` / ``read_sparsify`` return ``(cfg, tensors)``:
  an ``SAEConfig`` and a dict of latent-major tensors ``W_enc [d_sae, d_model]``, ``b_enc [d_sae]``,
  ``W_dec [d_sae, d_model]``, ``b_dec [d_model]``, ``threshold [d_sae]`` (JumpReLU thresholds; zeros
  for a TopK SAE), the layout of ``sae_kernels.fold``. Whatever a format does differently (a
  transposed matrix, ``b_dec`` subtracted from the input, a gated encoder, the decoder-norm rescaling)
  is converted into these in float64, so the tensors of the foreign formats are float64 and
  ``cfg.dtype`` names the dtype to cast them to: the one the checkpoint stores (SAELens, sparsify),
  float64 for Llama Scope. ``read_sae`` returns the tensors as stored (``cfg.dtype``'s).
* ``write_sae`` / ``write_llama_scope`` / ``write_saelens`` / ``write_sparsify`` take ``(cfg, tensors)``
  in the same layout (a module's ``state_dict()`` is one) and a folder.

Every file is written atomically (``sae_kernels.atomic``), so a killed process leaves either the old
file or the new one, never half of one.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from safetensors import safe_open

from ._validate import as_int
from .atomic import atomic_save_safetensors, atomic_write_json
from .config import DTYPES, SAEConfig
from .fold import fold_decoder_norm, folded, score_scale
from .sites import Site, hook_layer, hook_points

PathLike = Union[str, "os.PathLike[str]"]
Tensors = Dict[str, torch.Tensor]
State = Tuple[SAEConfig, Tensors]

LLAMA_SCOPE_WEIGHTS = "checkpoints/final.safetensors"
TENSOR_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


# ------------------------------------------------------------------------------ reading helpers


def read_json(path: PathLike, what: str) -> Dict[str, Any]:
    """A JSON object from ``path``; every failure is a ValueError naming the file and the problem
    (``what``, e.g. "hyperparams.json" or "--resume", starts the message)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what}: expected a file {path}, but it does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{what}: {path} is not UTF-8 text (byte {e.start}: {e.reason}); expected a JSON file"
        ) from None
    except OSError as e:
        raise ValueError(f"{what}: could not read {path} ({e.strerror or e})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what}: expected a JSON object in {path}, got {type(obj).__name__}")
    return obj


def _read_tensors(path: Path, what: str, required: Dict[str, Optional[tuple]]) -> Dict[str, torch.Tensor]:
    """Read ``path`` and check that each required key exists with the expected shape (None = any).

    Only safetensors are read (never a pickle); a truncated or corrupt file is a ValueError naming it.
    """
    if not path.is_file():
        raise ValueError(f"{what}: expected a file {path}, but it does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # SafetensorError (header, truncation), OSError, ...
        raise ValueError(
            f"{what}: {path} is not a readable safetensors file ({type(e).__name__}: {e})"
        ) from None
    for key, shape in required.items():
        if key not in tensors:
            raise ValueError(f"{what}: {path} has no tensor {key!r} (has {sorted(tensors)})")
        t = tensors[key]
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"{what}: tensor {key!r} in {path}: expected shape {list(shape)}, got {list(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{what}: tensor {key!r} in {path}: expected floating-point values, got {t.dtype}")
    return tensors


def _require(obj: Dict[str, Any], keys, what: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"{what}: missing keys {missing}")


_MISSING = object()


def _get_int(obj: Dict[str, Any], key: str, where: str, lo: int = 1, hi: Optional[int] = None,
             default: Any = _MISSING, hi_name: str = "") -> int:
    """``obj[key]`` as an int in [lo, hi]; anything else (null, 2.7, "5", true, out of range) is refused."""
    if key not in obj:
        if default is _MISSING:
            raise ValueError(f"{where}: missing key {key!r}")
        return default
    v = obj[key]
    bound = f"{lo} <= {key}" + (f" <= {hi_name or hi}" if hi is not None else "")
    try:
        i = as_int(key, v)
    except ValueError:
        raise ValueError(f"{where}: {key}: expected an integer {bound}, got {v!r}") from None
    if i < lo or (hi is not None and i > hi):
        raise ValueError(f"{where}: {key}: expected an integer {bound}, got {i}")
    return i


def _get_bool(obj: Dict[str, Any], key: str, where: str, default: bool) -> bool:
    """``obj[key]`` as a JSON bool: the string "false" is not false, so it is refused."""
    v = obj.get(key, default)
    if not isinstance(v, bool):
        raise ValueError(f"{where}: {key}: expected true or false, got {v!r}")
    return v


def _get_float(obj: Dict[str, Any], key: str, where: str, positive: bool = False) -> float:
    v = obj.get(key, None)
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or not positive)
    if not ok:
        want = "a finite positive number" if positive else "a finite number"
        raise ValueError(f"{where}: {key}: expected {want}, got {v!r}")
    return float(v)


def _get_str(obj: Dict[str, Any], key: str, where: str, default: Optional[str] = None) -> Optional[str]:
    v = obj.get(key, default)
    if v is not None and not isinstance(v, str):
        raise ValueError(f"{where}: {key}: expected a string or null, got {v!r}")
    return v


def _tensor_dtype_name(t: torch.Tensor) -> str:
    name = str(t.dtype).replace("torch.", "")
    return name if name in DTYPES else "float32"


def _state(cfg: SAEConfig, W_enc, b_enc, W_dec, b_dec, threshold=None) -> State:
    """``(cfg, tensors)`` from converted float64 tensors: contiguous (a transposed view would change the
    order of the folds' row-norm sums, and so their last bit), the threshold a ``[d_sae]`` tensor
    (from a scalar, or zeros when None)."""
    th = torch.zeros(()) if threshold is None else threshold
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec,
               "threshold": torch.as_tensor(th, dtype=torch.float64).expand(cfg.d_sae)}
    return cfg, {k: v.to(torch.float64).contiguous() for k, v in tensors.items()}


def _site(hook_in: Optional[str], hook_out: Optional[str]) -> Tuple[Optional[int], Optional[str]]:
    """(layer, position) of TransformerLens hook names (``sae_kernels.sites``), else (layer or None, None)."""
    site = Site.from_hooks(hook_in, hook_out or hook_in)
    return (site.layer, site.position) if site is not None else (hook_layer(hook_in), None)


# ------------------------------------------------------------------------------ our own format


def _given(tensors: Tensors, cfg: SAEConfig, what: str) -> Tensors:
    """The five state tensors of ``tensors`` (a missing threshold is zeros), detached; a missing one is
    a ValueError naming ``what``."""
    missing = [k for k in TENSOR_NAMES[:4] if k not in tensors]
    if missing:
        raise ValueError(f"{what}: tensors: missing {missing} (expected {list(TENSOR_NAMES)})")
    out = {k: tensors[k].detach() for k in TENSOR_NAMES[:4]}
    th = tensors.get("threshold")
    out["threshold"] = th.detach() if th is not None else torch.zeros(cfg.d_sae, dtype=out["W_enc"].dtype)
    return out


def write_sae(cfg: SAEConfig, tensors: Tensors, path: PathLike) -> None:
    """Our format: ``path/sae.safetensors`` (the five state tensors as given) + ``path/config.json``
    (``cfg.to_dict()``), the config last."""
    path = Path(path)
    t = _given(tensors, cfg, "write_sae")
    atomic_save_safetensors(path / "sae.safetensors", t, metadata={"format": "sae-kernels"})
    atomic_write_json(path / "config.json", cfg.to_dict())


def _other_format_hint(path: Path) -> str:
    """Which loader a folder that is not ours belongs to ('' if none is recognised)."""
    if (path / "hyperparams.json").is_file():
        return f"it is a Llama Scope folder (hyperparams.json): load it with TopKSAE.from_llama_scope({str(path)!r})"
    if (path / "cfg.json").is_file() and (path / "sae_weights.safetensors").is_file():
        return f"it is a SAELens folder (cfg.json + sae_weights.safetensors): load it with TopKSAE.from_saelens({str(path)!r})"
    if (path / "cfg.json").is_file() and (path / "sae.safetensors").is_file():
        return f"it is a sparsify folder (cfg.json + sae.safetensors): load it with TopKSAE.from_sparsify({str(path)!r})"
    if path.is_dir() and next(iter(path.glob("*/hyperparams.json")), None) is not None:
        names = sorted(p.parent.name for p in path.glob("*/hyperparams.json"))[:4]
        return (f"it holds Llama Scope folders ({', '.join(names)}, ...): load one with "
                f"TopKSAE.from_llama_scope({str(path)!r}, name=...)")
    return ""


def read_sae(path: PathLike) -> State:
    """A folder written by ``write_sae`` (``TopKSAE.save``): its config and its tensors as stored. A folder
    in another format is refused with a pointer to its loader."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"path: expected a folder written by TopKSAE.save, got {str(path)!r}")
    if not (path / "config.json").is_file():
        hint = _other_format_hint(path)
        raise ValueError(
            f"path: {str(path)!r} has no config.json, so it was not written by TopKSAE.save"
            + (f"; {hint}" if hint else "")
        )
    cfg_file = path / "config.json"
    cfg = SAEConfig.from_dict(read_json(cfg_file, "config.json"), source=f"config.json ({cfg_file})")
    n, d = cfg.d_sae, cfg.d_model
    t = _read_tensors(
        path / "sae.safetensors", "path",
        {"W_enc": (n, d), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,), "threshold": (n,)},
    )
    return cfg, {name: t[name] for name in TENSOR_NAMES}


# ------------------------------------------------------------------------------ Llama Scope


def _resolve_llama_scope(path_or_repo: PathLike, name: Optional[str]) -> Path:
    """The folder holding hyperparams.json: the path itself, its subfolder for ``name``, or a Hub download."""
    p = Path(path_or_repo)
    if not p.exists():
        repo = str(path_or_repo)
        if repo.count("/") != 1 or repo.startswith((".", "/")):
            raise ValueError(
                f"path_or_repo: {repo!r} is neither an existing folder nor a Hub repo id such as "
                "'fnlp/Llama3_1-8B-Base-LXR-8x'"
            )
        if not name:
            raise ValueError(
                f"name: a Hub repo ({repo!r}) holds many SAEs; pass the SAE name, e.g. name='L15R-8x'"
            )
        try:
            from huggingface_hub import snapshot_download

            p = Path(snapshot_download(repo, allow_patterns=[f"*{name}/*", f"*{name}/**"]))
        except Exception as e:  # offline, unknown repo, no permission
            raise ValueError(
                f"path_or_repo: could not download {name!r} from the Hub repo {repo!r} "
                f"({type(e).__name__}: {e}). Offline? Download the folder and pass its local path."
            ) from None
    if not p.is_dir():
        raise ValueError(f"path_or_repo: expected a folder, got the file {str(p)!r}")
    if (p / "hyperparams.json").is_file() and not name:
        return p
    if name:
        if p.name == name or p.name.endswith("-" + name):
            return p
        matches = sorted(
            c for c in p.rglob("hyperparams.json")
            if c.parent.name == name or c.parent.name.endswith("-" + name)
        )
        if not matches:
            raise ValueError(f"name: no SAE folder named like {name!r} (with hyperparams.json) under {str(p)!r}")
        return matches[0].parent
    if (p / "hyperparams.json").is_file():
        return p
    found = sorted(c.parent.name for c in p.rglob("hyperparams.json"))
    raise ValueError(
        f"path_or_repo: {str(p)!r} has no hyperparams.json"
        + (f"; pass name= one of {found[:8]}" if found else "")
    )


def read_llama_scope(path_or_repo: PathLike, name: Optional[str] = None, *, fold: bool = True) -> State:
    """A released Llama Scope SAE (a local folder, or a Hub repo id plus SAE name; docs/method.md sec. 7).

    ``fold=True`` returns the state of the method's inference: dataset norms folded, then decoder norms
    folded into the encoder, with the released scalar ``jump_relu_threshold`` (act_fn jumprelu) as the
    threshold of every latent, exactly. ``fold=False`` returns the raw training state (normalised space,
    ``norm_in`` / ``norm_out``, weighted selection) with the threshold in that state's score units.
    The tensors are float64 and ``cfg.dtype`` is "float64".
    """
    folder = _resolve_llama_scope(path_or_repo, name)
    hp_file = folder / "hyperparams.json"
    hp = read_json(hp_file, "hyperparams.json")
    where = f"hyperparams.json ({hp_file})"
    d = _get_int(hp, "d_model", where)
    n = _get_int(hp, "d_sae", where)
    act = hp.get("act_fn")
    if not isinstance(act, str) or act.lower() not in ("jumprelu", "topk", "relu"):
        raise ValueError(f"{where}: act_fn: expected 'jumprelu', 'topk' or 'relu', got {act!r}")
    act = act.lower()
    relu = act == "relu"  # the vanilla SAE: JumpReLU at threshold 0
    act = "jumprelu" if relu else act
    norm = hp.get("norm_activation", "dataset-wise")
    if norm == "dataset-wise":
        _require(hp, ("dataset_average_activation_norm",), where)
        mu = hp["dataset_average_activation_norm"]
        if not isinstance(mu, dict) or "in" not in mu or "out" not in mu:
            raise ValueError(f"{where}: dataset_average_activation_norm: expected {{'in': mu_in, 'out': mu_out}}, got {mu!r}")
        mu_in = _get_float(mu, "in", f"{where}: dataset_average_activation_norm", positive=True)
        mu_out = _get_float(mu, "out", f"{where}: dataset_average_activation_norm", positive=True)
        s_in, s_out = math.sqrt(d) / mu_in, math.sqrt(d) / mu_out
    elif norm in (None, "none", "None"):
        s_in = s_out = 1.0
    else:
        raise ValueError(
            f"{where}: norm_activation: expected 'dataset-wise' or 'none', got {norm!r} "
            "(token-wise normalisation cannot be folded into fixed weights)"
        )
    weighted = _get_bool(hp, "sparsity_include_decoder_norm", where, True)
    use_b_dec = _get_bool(hp, "use_decoder_bias", where, True)
    pre_b_dec = _get_bool(hp, "apply_decoder_bias_to_pre_encoder", where, False)
    # top_k is the TopK's k, or the target L0 of a JumpReLU SAE (informational there): either way
    # an integer in [1, d_sae]; a JumpReLU folder may leave it out.
    k = _get_int(hp, "top_k", where, lo=1, hi=n, hi_name=f"d_sae={n}",
                 default=_MISSING if act == "topk" else min(50, n))
    hook_in = _get_str(hp, "hook_point_in", where)
    hook_out = _get_str(hp, "hook_point_out", where, hook_in)
    t = _read_tensors(
        folder / LLAMA_SCOPE_WEIGHTS, f"checkpoint of {folder.name}",
        {"encoder.weight": (n, d), "encoder.bias": (n,), "decoder.weight": (d, n), "decoder.bias": (d,)},
    )
    W_enc = t["encoder.weight"].double()
    b_enc = t["encoder.bias"].double()
    W_dec = t["decoder.weight"].double().t()
    b_dec = t["decoder.bias"].double()
    if not use_b_dec:
        b_dec = torch.zeros_like(b_dec)
    if pre_b_dec:
        b_enc = b_enc - W_enc @ b_dec  # W_enc (x_n - b_dec) + b_enc, in normalised space
    layer, position = _site(hook_in, hook_out)
    cfg = SAEConfig(
        d_model=d, d_sae=n, k=k, weighted_topk=weighted, activation=act,
        dtype="float64", norm_in=s_in, norm_out=s_out, hook_point_in=hook_in, hook_point_out=hook_out,
        model_name=_read_model_name(folder), layer=layer, position=position,
    )
    theta = None
    if relu:
        theta = 0.0
    elif act == "jumprelu":
        _require(hp, ("jump_relu_threshold",), where)
        theta = _get_float(hp, "jump_relu_threshold", where)
    # Threshold in the unfolded state's score units: the method gates h' = z * n / s_out (weighted) or
    # z / s_in, and folding the dataset norms divides the threshold by that factor.
    state = _state(cfg, W_enc, b_enc, W_dec, b_dec, None if theta is None else theta * score_scale(cfg))
    if fold:
        cfg, tensors = folded(*state)
        if theta is not None:  # exactly the released scalar, no rounding through the factor
            tensors["threshold"] = torch.full((n,), theta, dtype=torch.float64)
        state = cfg, tensors
    return state


def _read_model_name(folder: Path) -> Optional[str]:
    f = folder / "lm_config.json"
    if not f.is_file():
        return None
    lm = read_json(f, "lm_config.json")
    return _get_str(lm, "model_name", f"lm_config.json ({f})")


def write_llama_scope(
    cfg: SAEConfig, tensors: Tensors, path: PathLike, hyperparams: Optional[dict] = None,
    lm_config: Optional[dict] = None, dtype: Optional[str] = None,
) -> None:
    """The released Llama Scope layout (docs/method.md sec. 7): ``hyperparams.json`` (with
    ``hyperparams`` merged in, written last), ``lm_config.json``, ``checkpoints/final.safetensors``.

    The state is written unfolded, as given: ``norm_in`` / ``norm_out`` become the dataset norms and a
    JumpReLU SAE's one threshold (per-latent thresholds are refused) is written in the folded units the
    release uses. Tensors in ``dtype`` (default: ``W_enc``'s).
    """
    if dtype and dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {dtype!r}")
    t = _given(tensors, cfg, "write_llama_scope")
    d, n = cfg.d_model, cfg.d_sae
    factor = score_scale(cfg)
    theta = 0.0
    if cfg.activation == "jumprelu":
        th = t["threshold"].double()
        if not bool((th == th[0]).all()):
            raise ValueError(
                "sae: the Llama Scope format stores one scalar jump_relu_threshold; this SAE has per-latent "
                "thresholds (use save() or to_saelens() instead)"
            )
        theta = float(th[0]) / factor
    hook_in, hook_out = cfg.hook_point_in, cfg.hook_point_out
    if hook_in is None and cfg.layer is not None and cfg.position is not None:
        hook_in, hook_out = hook_points(cfg.layer, cfg.position)
    hp = {
        "d_model": d, "d_sae": n, "expansion_factor": n // d if n % d == 0 else n / d,
        "hook_point_in": hook_in, "hook_point_out": hook_out or hook_in,
        # a JumpReLU at threshold 0 is a ReLU SAE: Llama Scope's vanilla "relu"
        "act_fn": "relu" if cfg.activation == "jumprelu" and theta == 0 else cfg.activation,
        "jump_relu_threshold": theta, "top_k": cfg.k,
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": math.sqrt(d) / cfg.norm_in, "out": math.sqrt(d) / cfg.norm_out},
        "sparsity_include_decoder_norm": cfg.weighted_topk,
        "apply_decoder_bias_to_pre_encoder": False, "use_decoder_bias": True,
        "init_decoder_norm": 0.5, "use_batch_norm_mse": True, "tp_size": 1, "ddp_size": 1,
        "dtype": f"torch.{dtype or cfg.dtype}", "lp": 2, "l1_coefficient": 0.0,
    }
    hp.update(hyperparams or {})
    lm = {"model_name": cfg.model_name, "d_model": d}
    lm.update(lm_config or {})
    if not isinstance(lm.get("model_name"), str) or not lm["model_name"]:
        # The release code's reader needs a string here (null breaks it). Say so instead of guessing.
        warnings.warn(
            "to_llama_scope: the SAE has no model name (cfg.model_name is None); lm_config.json gets "
            "model_name 'unknown'. Set cfg.model_name or pass lm_config={'model_name': ...}.",
            stacklevel=3,
        )
        lm["model_name"] = "unknown"
    dt = DTYPES[dtype] if dtype else t["W_enc"].dtype
    path = Path(path)
    atomic_save_safetensors(path / LLAMA_SCOPE_WEIGHTS, {
        "encoder.weight": t["W_enc"].to(dt), "encoder.bias": t["b_enc"].to(dt),
        "decoder.weight": t["W_dec"].to(dt).t(), "decoder.bias": t["b_dec"].to(dt),
    })
    atomic_write_json(path / "lm_config.json", lm)
    atomic_write_json(path / "hyperparams.json", hp)  # last: its presence marks a complete folder


# ------------------------------------------------------------------------------ SAELens

# Architectures of SAELens (6.x, and the configs of 5.x) whose inference TopKSAE reproduces exactly.
SAELENS_ARCHITECTURES = (
    "standard", "jumprelu", "gated", "topk", "batchtopk", "matryoshka_batchtopk",
    "transcoder", "jumprelu_transcoder",
)
_SAELENS_REFUSED = {
    "abstopk": "its TopK selects by |pre-activation| and keeps negative values",
    "skip_transcoder": "it adds a skip matrix W_skip x",
    "jumprelu_skip_transcoder": "it adds a skip matrix W_skip x",
    "temporal": "its encoder attends over previous tokens",
    "matching_pursuit": "its encoder is iterative matching pursuit",
}
# The SAELens config layout to_saelens writes (SAELens >= 6 reads metadata only from such configs).
SAELENS_FORMAT_VERSION = "6.0.0"


def read_saelens(path: PathLike) -> State:
    """A SAELens folder (``cfg.json`` + ``sae_weights.safetensors``, SAELens 6 or earlier), as the state
    whose latents equal SAELens's ``encode`` (see ``TopKSAE.from_saelens`` for the architectures).

    ``apply_b_dec_to_input`` is folded into ``b_enc``, a gated encoder becomes a JumpReLU one, 5.x's
    ``scaling_factor`` goes into the decoder rows, and ``rescale_acts_by_decoder_norm`` is read as
    weighted selection and then folded (``fold_decoder_norm``: unit-norm decoder rows). The tensors are
    float64; ``cfg.dtype`` is the config's ``dtype``, else the stored tensors'.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"path: expected a SAELens folder (cfg.json + sae_weights.safetensors), got {str(path)!r}")
    cfg_file = path / "cfg.json"
    c = read_json(cfg_file, "cfg.json")
    where = f"cfg.json ({cfg_file})"
    meta = c.get("metadata") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: metadata: expected a JSON object, got {meta!r}")

    def field(*keys):  # SAELens 6 keeps provenance under "metadata"; 5.x at the top level
        for key in keys:
            for src in (c, meta):
                if src.get(key) is not None:
                    return src[key]
        return None

    arch = c.get("architecture", "standard")
    act_fn = c.get("activation_fn", c.get("activation_fn_str"))  # 5.x configs
    kwargs = c.get("activation_fn_kwargs") or {}
    if arch == "standard" and act_fn == "topk":
        arch = "topk"  # how SAELens reads a 5.x TopK config
    if arch in _SAELENS_REFUSED:
        raise ValueError(f"{where}: architecture {arch!r} cannot be loaded as a TopKSAE: {_SAELENS_REFUSED[arch]}")
    if arch not in SAELENS_ARCHITECTURES:
        raise ValueError(f"{where}: architecture: expected one of {SAELENS_ARCHITECTURES}, got {arch!r}")
    if act_fn not in (None, "relu", "topk"):
        raise ValueError(f"{where}: activation_fn: expected 'relu' or 'topk', got {act_fn!r}")
    d = _get_int(c, "d_in", where)
    n = _get_int(c, "d_sae", where)
    transcoder = arch in ("transcoder", "jumprelu_transcoder")
    if transcoder and _get_int(c, "d_out", where, default=d) != d:
        raise ValueError(f"{where}: d_out={c['d_out']} != d_in={d}: a TopKSAE reads and writes one width")
    norm = c.get("normalize_activations", "none")
    if norm in (None, False):
        norm = "none"
    if norm != "none":
        raise ValueError(
            f"{where}: normalize_activations={norm!r} is not supported (its scaling is not stored with the "
            "weights, or is computed per token); fold it into the weights first"
        )
    # SAELens subtracts b_dec from the input unless told otherwise, for every architecture
    # (transcoders never do: their b_dec lives in the output space).
    apply_b_dec = False if transcoder else _get_bool(c, "apply_b_dec_to_input", where, True)
    rescale = _get_bool(c, "rescale_acts_by_decoder_norm", where, False)
    hook_name = field("hook_name", "hook_point")
    hook_out = field("hook_name_out") or hook_name
    for key, v in (("hook_name", hook_name), ("hook_name_out", hook_out), ("model_name", field("model_name"))):
        if v is not None and not isinstance(v, str):
            raise ValueError(f"{where}: {key}: expected a string, got {v!r}")
    reshape = c.get("reshape_activations")
    if reshape is None:  # 5.x: an SAE on hook_z flattened the heads
        reshape = "hook_z" if "hook_z" in (hook_name or "") else "none"
    if reshape not in ("none", "hook_z"):
        raise ValueError(f"{where}: reshape_activations: expected 'none' or 'hook_z', got {reshape!r}")
    layer = field("hook_layer")
    if layer is not None:
        layer = _get_int({"hook_layer": layer}, "hook_layer", where, lo=0)
    site_layer, position = _site(hook_name, hook_out)
    if layer is None:
        layer = site_layer

    req = {"W_enc": (d, n), "W_dec": (n, d), "b_dec": (d,)}
    req.update({"b_gate": (n,), "b_mag": (n,), "r_mag": (n,)} if arch == "gated" else {"b_enc": (n,)})
    t = _read_tensors(path / "sae_weights.safetensors", f"SAELens weights in {path}", req)
    W_enc, W_dec, b_dec = t["W_enc"].double().t(), t["W_dec"].double(), t["b_dec"].double()
    weighted, threshold, activation = False, None, "jumprelu"
    k = min(50, n)  # the target L0 of a JumpReLU SAE: informational
    if arch == "gated":
        # f = [W x + b_gate > 0] * relu(e^r W x + b_mag): with W' = e^r W and b' = b_mag this is
        # relu(W' x + b') gated at W' x + b' > b_mag - e^r b_gate (a per-latent JumpReLU threshold;
        # where that is negative the gate passes exactly what relu passes).
        r = t["r_mag"].double().exp()
        W_enc = W_enc * r[:, None]
        b_enc = t["b_mag"].double()
        threshold = b_enc - r * t["b_gate"].double()
    else:
        b_enc = t["b_enc"].double()
    if arch in ("standard", "transcoder"):
        threshold = torch.zeros(n, dtype=torch.float64)  # ReLU: relu(pre) > 0 passes all of relu
    elif arch in ("jumprelu", "jumprelu_transcoder"):
        if "threshold" in t:
            threshold = _checked(t, "threshold", (n,), path).double()
        elif "log_threshold" in t:  # older JumpReLU checkpoints
            threshold = _checked(t, "log_threshold", (n,), path).double().exp()
        else:
            raise ValueError(f"SAELens weights in {path}: {arch} needs a tensor 'threshold' (has {sorted(t)})")
    elif arch == "topk":
        activation, weighted = "topk", rescale
        k = _get_int({"k": c.get("k", kwargs.get("k", 100))}, "k", where, hi=n, hi_name=f"d_sae={n}")
    elif arch in ("batchtopk", "matryoshka_batchtopk"):
        # A training checkpoint; SAELens exports it as a JumpReLU SAE with the learned batch threshold,
        # compared with relu(pre) * ||W_dec[i]|| when rescale_acts_by_decoder_norm is on.
        weighted = rescale
        threshold = float(_checked(t, "topk_threshold", (), path).double())
        kf = c.get("k", 100)
        if isinstance(kf, bool) or not isinstance(kf, (int, float)) or not math.isfinite(kf) or kf <= 0:
            raise ValueError(f"{where}: k: expected a positive number, got {kf!r}")
        k = min(n, max(1, round(kf)))
    if "scaling_factor" in t:  # SAELens < 6 scaled the latents before decoding: fold into W_dec rows
        W_dec = W_dec * _checked(t, "scaling_factor", (n,), path).double()[:, None]
    if apply_b_dec:
        b_enc = b_enc - W_enc @ b_dec
    dtype = c.get("dtype")
    dtype = dtype.replace("torch.", "") if isinstance(dtype, str) else None
    if dtype not in DTYPES:
        dtype = _tensor_dtype_name(t["W_enc"])
    cfg = SAEConfig(
        d_model=d, d_sae=n, k=k, weighted_topk=weighted, activation=activation, dtype=dtype,
        hook_point_in=hook_name, hook_point_out=hook_out, model_name=field("model_name"), layer=layer,
        position=position, reshape_activations=reshape,
    )
    state = _state(cfg, W_enc, b_enc, W_dec, b_dec, threshold)
    if weighted:  # latents = SAELens's encode (relu(pre) * ||W_dec[i]||), unit-norm rows
        return fold_decoder_norm(*state)
    return state


def _checked(t: Dict[str, torch.Tensor], key: str, shape: tuple, path: Path) -> torch.Tensor:
    if key not in t:
        raise ValueError(f"SAELens weights in {path}: no tensor {key!r} (has {sorted(t)})")
    v = t[key]
    if tuple(v.shape) != tuple(shape):
        raise ValueError(f"SAELens weights in {path}: tensor {key!r}: expected shape {list(shape)}, got {list(v.shape)}")
    return v


def write_saelens(cfg: SAEConfig, tensors: Tensors, path: PathLike) -> None:
    """SAELens 6's layout (``cfg.json`` + ``sae_weights.safetensors``), written from the folded state
    (SAELens selects and gates on the plain pre-activation): architecture topk, or jumprelu / standard
    (every threshold 0) and their transcoder forms; metadata with model_name, hook_name, hook_layer."""
    cfg, f = folded(cfg, _given(tensors, cfg, "write_saelens"))
    hook_in = cfg.hook_point_in
    hook_out = cfg.hook_point_out or hook_in
    transcoder = hook_out != hook_in
    out = {"W_enc": f["W_enc"].t(), "W_dec": f["W_dec"], "b_enc": f["b_enc"], "b_dec": f["b_dec"]}
    if cfg.activation == "topk":
        arch = "topk"  # SAELens has no TopK transcoder: metadata.hook_name_out records the target
    else:
        relu = bool((f["threshold"] == 0).all())
        arch = ("transcoder" if relu else "jumprelu_transcoder") if transcoder else ("standard" if relu else "jumprelu")
        if not relu:
            out["threshold"] = f["threshold"].to(f["W_enc"].dtype)
    layer = cfg.layer if cfg.layer is not None else hook_layer(hook_in)
    metadata = {
        "sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
        "model_name": cfg.model_name, "hook_name": hook_in, "hook_layer": layer, "hook_head_index": None,
        "prepend_bos": True, "written_by": "sae-kernels",
    }
    if transcoder:
        metadata["hook_name_out"] = hook_out
    c = {
        "architecture": arch, "d_in": cfg.d_model, "d_sae": cfg.d_sae, "dtype": cfg.dtype, "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none",
        "reshape_activations": cfg.reshape_activations, "metadata": metadata,
        # Read by SAELens 5.x and by SAEBench, which look at the top level first.
        "model_name": cfg.model_name, "hook_name": hook_in, "hook_layer": layer,
        "activation_fn_str": "topk" if arch == "topk" else "relu",
        "activation_fn_kwargs": {"k": cfg.k} if arch == "topk" else {},
    }
    if arch == "topk":
        c.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    if arch in ("transcoder", "jumprelu_transcoder"):
        c["d_out"] = cfg.d_model
    path = Path(path)
    atomic_save_safetensors(path / "sae_weights.safetensors", out)
    atomic_write_json(path / "cfg.json", c)


# ------------------------------------------------------------------------------ EleutherAI sparsify


def read_sparsify(path: PathLike) -> State:
    """An EleutherAI sparsify folder (``cfg.json`` + ``sae.safetensors``): ``relu(encoder(x - b_dec))``
    (``b_dec`` folded into ``b_enc``; a transcoder's encoder reads ``x``), TopK, ``W_dec``, ``b_dec``.
    The tensors are float64; ``cfg.dtype`` is the stored tensors'."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"path: expected a sparsify folder (cfg.json + sae.safetensors), got {str(path)!r}")
    cfg_file = path / "cfg.json"
    c = read_json(cfg_file, "cfg.json")
    where = f"cfg.json ({cfg_file})"
    if c.get("activation", "topk") != "topk":
        raise ValueError(f"{where}: activation: expected 'topk', got {c['activation']!r}")
    if _get_bool(c, "skip_connection", where, False):
        raise ValueError(f"{where}: skip_connection=true is not supported (TopKSAE has no skip matrix)")
    d = _get_int(c, "d_in", where)
    n = _get_int(c, "num_latents", where, lo=0, default=0) or d * _get_int(c, "expansion_factor", where, default=32)
    k = _get_int(c, "k", where, hi=n, hi_name=f"num_latents={n}")
    transcode = _get_bool(c, "transcode", where, False)
    t = _read_tensors(
        path / "sae.safetensors", f"sparsify weights in {path}",
        {"encoder.weight": (n, d), "encoder.bias": (n,), "W_dec": (n, d), "b_dec": (d,)},
    )
    W_enc, b_enc = t["encoder.weight"].double(), t["encoder.bias"].double()
    W_dec, b_dec = t["W_dec"].double(), t["b_dec"].double()
    if not transcode:
        b_enc = b_enc - W_enc @ b_dec  # sparsify encodes x - b_dec
    cfg = SAEConfig(d_model=d, d_sae=n, k=k, weighted_topk=False, dtype=_tensor_dtype_name(t["encoder.weight"]))
    return _state(cfg, W_enc, b_enc, W_dec, b_dec)


def write_sparsify(cfg: SAEConfig, tensors: Tensors, path: PathLike) -> None:
    """sparsify's layout (read by ``sparsify.SparseCoder.load_from_disk``), from the folded state:
    ``relu(encoder(x - b_dec))``, TopK, ``W_dec``, ``b_dec``. TopK SAEs only (sparsify has no JumpReLU)."""
    if cfg.activation != "topk":
        th = tensors.get("threshold")
        relu = th is not None and bool((th == 0).all())
        what = ("ReLU (architecture 'standard')" if relu else
                "JumpReLU (architecture 'jumprelu', or 'batchtopk' / 'matryoshka_batchtopk' at their inference threshold)")
        raise ValueError(f"sae: sparsify stores TopK SAEs only; this SAE is {what} (use to_saelens() or save() instead)")
    cfg, f = folded(cfg, _given(tensors, cfg, "write_sparsify"))
    transcode = cfg.hook_point_out is not None and cfg.hook_point_in != cfg.hook_point_out
    dt = f["W_enc"].dtype
    bias = f["b_enc"].double()
    if not transcode:
        bias = bias + f["W_enc"].double() @ f["b_dec"].double()  # undo sparsify's x - b_dec
    n, d = cfg.d_sae, cfg.d_model
    norms = f["W_dec"].double().norm(dim=1)
    tol = 1e-2 if dt in (torch.bfloat16, torch.float16) else 1e-5
    c = {
        "activation": "topk", "expansion_factor": max(1, n // d), "num_latents": n, "k": cfg.k,
        "normalize_decoder": bool(torch.allclose(norms, torch.ones_like(norms), atol=tol)),
        "multi_topk": False, "skip_connection": False, "transcode": transcode, "d_in": d,
    }
    path = Path(path)
    atomic_save_safetensors(path / "sae.safetensors", {
        "encoder.weight": f["W_enc"], "encoder.bias": bias.to(dt), "W_dec": f["W_dec"], "b_dec": f["b_dec"],
    })
    atomic_write_json(path / "cfg.json", c)
