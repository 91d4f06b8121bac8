"""Checkpoint formats: our own, the released Llama Scope layout, SAELens and EleutherAI sparsify.

Every file is written atomically (a temporary file in the same folder, fsync, ``os.replace``), so a
killed process leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import DTYPES, SAEConfig
from .sae import TopKSAE

PathLike = Union[str, "os.PathLike[str]"]

LLAMA_SCOPE_WEIGHTS = "checkpoints/final.safetensors"

# TransformerLens hook names of the four positions (SPEC sec. 1): (input, output).
HOOK_NAMES = {
    "R": ("blocks.{L}.hook_resid_post", "blocks.{L}.hook_resid_post"),
    "A": ("blocks.{L}.hook_attn_out", "blocks.{L}.hook_attn_out"),
    "M": ("blocks.{L}.hook_mlp_out", "blocks.{L}.hook_mlp_out"),
    "TC": ("blocks.{L}.ln2.hook_normalized", "blocks.{L}.hook_mlp_out"),
}


def hook_points(layer: int, position: str) -> tuple:
    """TransformerLens names ``(hook_point_in, hook_point_out)`` of ``position`` at ``layer``."""
    if position not in HOOK_NAMES:
        raise ValueError(f"position: expected one of {tuple(HOOK_NAMES)}, got {position!r}")
    return tuple(h.format(L=layer) for h in HOOK_NAMES[position])


# ------------------------------------------------------------------------------ atomic writes


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_json(path: PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")


def atomic_save_safetensors(path: PathLike, tensors: Dict[str, torch.Tensor], metadata=None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


# ------------------------------------------------------------------------------ reading helpers


def _read_json(path: Path, what: str) -> Dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{what}: expected a file {path}, but it does not exist")
    try:
        with open(path) as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what}: expected a JSON object in {path}")
    return obj


def _read_tensors(path: Path, what: str, required: Dict[str, Optional[tuple]]) -> Dict[str, torch.Tensor]:
    """Read ``path`` and check that each required key exists with the expected shape (None = any)."""
    if not path.is_file():
        raise ValueError(f"{what}: expected a file {path}, but it does not exist")
    out = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        for key, shape in required.items():
            if key not in keys:
                raise ValueError(f"{what}: {path} has no tensor {key!r} (has {sorted(keys)})")
            t = f.get_tensor(key)
            if shape is not None and tuple(t.shape) != tuple(shape):
                raise ValueError(f"{what}: tensor {key!r} in {path}: expected shape {list(shape)}, got {list(t.shape)}")
            out[key] = t
        for key in keys - set(required):
            out[key] = f.get_tensor(key)
    return out


def _require(obj: Dict[str, Any], keys, what: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"{what}: missing keys {missing}")


def _finish(sae: TopKSAE, dtype: Optional[str], device) -> TopKSAE:
    """Cast a module assembled in float64 to ``dtype`` (name) and move it to ``device``."""
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {dtype!r}")
        sae.cfg = sae.cfg.replace(dtype=dtype)
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            p.data = p.data.to(DTYPES[dtype])
    if device is not None:
        sae.to(device)
    return sae


@torch.no_grad()
def _assemble(cfg: SAEConfig, W_enc, b_enc, W_dec, b_dec, threshold=None) -> TopKSAE:
    sae = TopKSAE(cfg, init=False)
    sae.W_enc.copy_(W_enc)
    sae.b_enc.copy_(b_enc)
    sae.W_dec.copy_(W_dec)
    sae.b_dec.copy_(b_dec)
    if threshold is not None:
        sae.threshold.copy_(torch.as_tensor(threshold, dtype=torch.float64).expand(cfg.d_sae))
    return sae


# ------------------------------------------------------------------------------ our own format


def save_sae(sae: TopKSAE, path: PathLike) -> None:
    path = Path(path)
    tensors = {
        "W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec,
        "threshold": sae.threshold,
    }
    atomic_save_safetensors(path / "sae.safetensors", tensors, metadata={"format": "sae-kernels"})
    atomic_write_json(path / "config.json", sae.cfg.to_dict())


def load_sae(path: PathLike, device=None) -> TopKSAE:
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"path: expected a folder written by TopKSAE.save, got {str(path)!r}")
    cfg = SAEConfig.from_dict(_read_json(path / "config.json", "path"))
    n, d = cfg.d_sae, cfg.d_model
    t = _read_tensors(
        path / "sae.safetensors", "path",
        {"W_enc": (n, d), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,), "threshold": (n,)},
    )
    sae = TopKSAE(cfg, init=False)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            getattr(sae, name).copy_(t[name])
    return sae.to(device) if device is not None else sae


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


def load_llama_scope(
    path_or_repo: PathLike, name: Optional[str] = None, *, fold: bool = True,
    dtype: Optional[str] = "float32", device=None,
) -> TopKSAE:
    folder = _resolve_llama_scope(path_or_repo, name)
    hp = _read_json(folder / "hyperparams.json", "hyperparams.json")
    _require(hp, ("d_model", "d_sae", "act_fn"), f"hyperparams.json in {folder}")
    d, n = int(hp["d_model"]), int(hp["d_sae"])
    act = str(hp["act_fn"]).lower()
    if act not in ("jumprelu", "topk"):
        raise ValueError(f"hyperparams.json: act_fn: expected 'jumprelu' or 'topk', got {hp['act_fn']!r}")
    norm = hp.get("norm_activation", "dataset-wise")
    if norm == "dataset-wise":
        _require(hp, ("dataset_average_activation_norm",), f"hyperparams.json in {folder}")
        mu = hp["dataset_average_activation_norm"]
        if not isinstance(mu, dict) or "in" not in mu or "out" not in mu:
            raise ValueError("hyperparams.json: dataset_average_activation_norm: expected {'in': mu_in, 'out': mu_out}")
        s_in, s_out = math.sqrt(d) / float(mu["in"]), math.sqrt(d) / float(mu["out"])
    elif norm in (None, "none", "None"):
        s_in = s_out = 1.0
    else:
        raise ValueError(
            f"hyperparams.json: norm_activation: expected 'dataset-wise' or 'none', got {norm!r} "
            "(token-wise normalisation cannot be folded into fixed weights)"
        )
    weighted = bool(hp.get("sparsity_include_decoder_norm", True))
    t = _read_tensors(
        folder / LLAMA_SCOPE_WEIGHTS, f"checkpoint of {folder.name}",
        {"encoder.weight": (n, d), "encoder.bias": (n,), "decoder.weight": (d, n), "decoder.bias": (d,)},
    )
    W_enc = t["encoder.weight"].double()
    b_enc = t["encoder.bias"].double()
    W_dec = t["decoder.weight"].double().t()
    b_dec = t["decoder.bias"].double()
    if not hp.get("use_decoder_bias", True):
        b_dec = torch.zeros_like(b_dec)
    if hp.get("apply_decoder_bias_to_pre_encoder", False):
        b_enc = b_enc - W_enc @ b_dec  # W_enc (x_n - b_dec) + b_enc, in normalised space
    k = int(hp.get("top_k", 50) or 50)
    cfg = SAEConfig(
        d_model=d, d_sae=n, k=min(max(k, 1), n), weighted_topk=weighted, activation=act,
        dtype="float64", norm_in=s_in, norm_out=s_out,
        hook_point_in=hp.get("hook_point_in"), hook_point_out=hp.get("hook_point_out"),
        model_name=_read_model_name(folder),
    )
    theta = None
    if act == "jumprelu":
        _require(hp, ("jump_relu_threshold",), f"hyperparams.json in {folder}")
        theta = float(hp["jump_relu_threshold"])
    # Threshold in the module's score units: the method gates h' = z * n / s_out (weighted) or z / s_in.
    factor = s_out if weighted else s_in
    sae = _assemble(cfg, W_enc, b_enc, W_dec, b_dec, None if theta is None else theta * factor)
    if fold:
        sae = sae.folded()
        if theta is not None:
            sae.threshold.fill_(theta)  # exactly the released scalar, no rounding through the factor
    return _finish(sae, dtype, device)


def _read_model_name(folder: Path) -> Optional[str]:
    f = folder / "lm_config.json"
    if f.is_file():
        try:
            return json.load(open(f)).get("model_name")
        except (json.JSONDecodeError, AttributeError):
            return None
    return None


def save_llama_scope(
    sae: TopKSAE, path: PathLike, hyperparams: Optional[dict] = None, lm_config: Optional[dict] = None,
    dtype: Optional[str] = None,
) -> None:
    cfg = sae.cfg
    d, n = cfg.d_model, cfg.d_sae
    factor = cfg.norm_out if cfg.weighted_topk else cfg.norm_in
    theta = 0.0
    if cfg.activation == "jumprelu":
        th = sae.threshold.double()
        if not bool((th == th[0]).all()):
            raise ValueError(
                "sae: the Llama Scope format stores one scalar jump_relu_threshold; this SAE has per-latent "
                "thresholds (use save() or to_saelens() instead)"
            )
        theta = float(th[0]) / factor
    hp = {
        "d_model": d, "d_sae": n, "expansion_factor": n // d if n % d == 0 else n / d,
        "hook_point_in": cfg.hook_point_in, "hook_point_out": cfg.hook_point_out,
        "act_fn": cfg.activation, "jump_relu_threshold": theta, "top_k": cfg.k,
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
    dt = DTYPES[dtype] if dtype else sae.W_enc.dtype
    path = Path(path)
    atomic_save_safetensors(path / LLAMA_SCOPE_WEIGHTS, {
        "encoder.weight": sae.W_enc.to(dt), "encoder.bias": sae.b_enc.to(dt),
        "decoder.weight": sae.W_dec.to(dt).t(), "decoder.bias": sae.b_dec.to(dt),
    })
    atomic_write_json(path / "lm_config.json", lm)
    atomic_write_json(path / "hyperparams.json", hp)  # last: its presence marks a complete folder


# ------------------------------------------------------------------------------ SAELens


def load_saelens(path: PathLike, device=None, dtype: Optional[str] = None) -> TopKSAE:
    path = Path(path)
    c = _read_json(path / "cfg.json", "cfg.json")
    _require(c, ("d_in", "d_sae"), f"cfg.json in {path}")
    d, n = int(c["d_in"]), int(c["d_sae"])
    arch = c.get("architecture", "standard")
    if arch not in ("standard", "jumprelu", "topk"):
        raise ValueError(f"cfg.json: architecture: expected 'standard', 'jumprelu' or 'topk', got {arch!r}")
    if c.get("normalize_activations") not in (None, "none"):
        raise ValueError(
            f"cfg.json: normalize_activations={c['normalize_activations']!r} is not supported "
            "(its scaling factor is not stored with the weights)"
        )
    req = {"W_enc": (d, n), "W_dec": (n, d), "b_enc": (n,), "b_dec": (d,)}
    if arch == "jumprelu":
        req["threshold"] = (n,)
    t = _read_tensors(path / "sae_weights.safetensors", f"SAELens weights in {path}", req)
    W_enc, b_enc = t["W_enc"].double().t(), t["b_enc"].double()
    W_dec, b_dec = t["W_dec"].double(), t["b_dec"].double()
    if c.get("apply_b_dec_to_input", arch != "topk"):
        b_enc = b_enc - W_enc @ b_dec
    k = (c.get("activation_fn_kwargs") or {}).get("k", c.get("k", 50))
    cfg = SAEConfig(
        d_model=d, d_sae=n, k=min(int(k), n), weighted_topk=False,
        activation="topk" if arch == "topk" else "jumprelu", dtype="float64",
        hook_point_in=c.get("hook_name"), hook_point_out=c.get("hook_name"),
        model_name=c.get("model_name"), layer=c.get("hook_layer"),
    )
    threshold = t["threshold"].double() if arch == "jumprelu" else None  # "standard" is ReLU: threshold 0
    sae = _assemble(cfg, W_enc, b_enc, W_dec, b_dec, threshold)
    return _finish(sae, dtype or str(t["W_enc"].dtype).replace("torch.", ""), device)


def save_saelens(sae: TopKSAE, path: PathLike) -> None:
    """Write SAELens' layout from a folded copy (SAELens selects and gates on the plain pre-activation)."""
    f = sae.folded()
    cfg = f.cfg
    arch = cfg.activation
    tensors = {"W_enc": f.W_enc.t(), "W_dec": f.W_dec, "b_enc": f.b_enc, "b_dec": f.b_dec}
    if arch == "jumprelu":
        tensors["threshold"] = f.threshold.to(f.W_enc.dtype)
    c = {
        "architecture": arch, "d_in": cfg.d_model, "d_sae": cfg.d_sae, "dtype": cfg.dtype, "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none",
        "activation_fn_kwargs": {"k": cfg.k} if arch == "topk" else {}, "k": cfg.k,
        "hook_name": cfg.hook_point_in, "hook_layer": cfg.layer, "model_name": cfg.model_name,
    }
    path = Path(path)
    atomic_save_safetensors(path / "sae_weights.safetensors", tensors)
    atomic_write_json(path / "cfg.json", c)


# ------------------------------------------------------------------------------ EleutherAI sparsify


def load_sparsify(path: PathLike, device=None, dtype: Optional[str] = None) -> TopKSAE:
    path = Path(path)
    c = _read_json(path / "cfg.json", "cfg.json")
    _require(c, ("d_in", "k"), f"cfg.json in {path}")
    if c.get("activation", "topk") != "topk":
        raise ValueError(f"cfg.json: activation: expected 'topk', got {c['activation']!r}")
    if c.get("skip_connection"):
        raise ValueError("cfg.json: skip_connection=true is not supported (TopKSAE has no skip matrix)")
    d = int(c["d_in"])
    n = int(c.get("num_latents") or d * int(c.get("expansion_factor", 32)))
    t = _read_tensors(
        path / "sae.safetensors", f"sparsify weights in {path}",
        {"encoder.weight": (n, d), "encoder.bias": (n,), "W_dec": (n, d), "b_dec": (d,)},
    )
    W_enc, b_enc = t["encoder.weight"].double(), t["encoder.bias"].double()
    W_dec, b_dec = t["W_dec"].double(), t["b_dec"].double()
    if not c.get("transcode", False):
        b_enc = b_enc - W_enc @ b_dec  # sparsify encodes x - b_dec
    cfg = SAEConfig(d_model=d, d_sae=n, k=min(int(c["k"]), n), weighted_topk=False, dtype="float64")
    sae = _assemble(cfg, W_enc, b_enc, W_dec, b_dec)
    return _finish(sae, dtype or str(t["encoder.weight"].dtype).replace("torch.", ""), device)
