"""SAEBench adapter: ``TopKSAE.to_saebench(...)`` returns a module meeting SAEBench's ``BaseSAE`` contract.

SAEBench (``sae_bench.custom_saes.base_sae.BaseSAE`` and its custom-SAE README) asks of an SAE:

* ``encode(x)`` (dense latents ``[..., d_sae]``), ``decode(f)``, ``forward(x)``; ``x`` ``[B, d_in]`` or
  ``[B, L, d_in]``;
* ``W_enc [d_in, d_sae]`` and ``W_dec [d_sae, d_in]`` as ``nn.Parameter``, with unit-norm decoder rows
  (its ``check_decoder_norms``), plus ``b_enc``, ``b_dec``;
* ``device`` and ``dtype`` attributes that follow ``.to(...)``;
* a ``cfg`` with ``model_name``, ``d_in``, ``d_sae``, ``hook_layer``, ``hook_name``, ``architecture``,
  ``dtype``, ``device`` and the blank SAELens fields its core evaluation reads (``CustomSAEConfig``).

The adapter holds the folded SAE (dataset norms folded, decoder norms folded into the encoder:
``sae_kernels.fold.folded`` of the SAE's state), so its ``encode`` / ``decode`` equal ``sae.folded()``'s.
A plain-TopK SAE whose decoder rows are not unit-norm cannot be folded without changing its selection;
the adapter then normalises the rows, scales the latents by the row norms (as SAELens's
``fold_W_dec_norm`` does) and keeps selecting by the unscaled value, so ``forward`` is unchanged.
sae_bench is imported only when it is installed (for its ``CustomSAEConfig``).
"""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from ._validate import as_int, check_tensor
from .fold import folded
from .sites import hook_layer as hook_layer_of


@dataclass
class SAEBenchConfig:
    """The fields of SAEBench's ``CustomSAEConfig``, used when sae_bench is not installed."""

    model_name: str
    d_in: int
    d_sae: int
    hook_layer: int
    hook_name: str
    context_size: Optional[int] = None
    hook_head_index: Optional[int] = None
    architecture: str = ""
    apply_b_dec_to_input: Optional[bool] = None
    finetuning_scaling_factor: Optional[bool] = None
    activation_fn_str: str = ""
    prepend_bos: bool = True
    normalize_activations: str = "none"
    dtype: str = ""
    device: str = ""
    dataset_path: str = ""
    dataset_trust_remote_code: bool = True
    seqpos_slice: tuple = (None,)
    training_tokens: int = -100_000
    sae_lens_training_version: Optional[str] = None
    neuronpedia_id: Optional[str] = None
    architecture_str: str = ""
    activation_fn_kwargs: Dict[str, Any] = field(default_factory=dict)
    model_from_pretrained_kwargs: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _config_class():
    """SAEBench's own ``CustomSAEConfig`` when sae_bench is installed, else the copy above."""
    if importlib.util.find_spec("sae_bench") is not None:
        try:
            from sae_bench.custom_saes.custom_sae_config import CustomSAEConfig

            return CustomSAEConfig
        except Exception:  # an incompatible sae_bench: the contract's fields are the same
            pass
    return SAEBenchConfig


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


class SAEBenchSAE(nn.Module):
    """A folded TopK or JumpReLU SAE in SAEBench's conventions (see the module docstring)."""

    def __init__(self, sae, model_name: str, hook_layer: int, hook_name: str,
                 context_size: Optional[int] = None) -> None:
        super().__init__()
        c, f = folded(sae.cfg, sae.state_dict())
        n, d = c.d_sae, c.d_model
        W_enc, b_enc, W_dec = f["W_enc"].double(), f["b_enc"].double(), f["W_dec"].double()
        threshold = f["threshold"].double()
        norms = W_dec.norm(dim=1)
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        dt, dev = f["W_enc"].dtype, f["W_enc"].device
        tol = 1e-2 if dt in (torch.bfloat16, torch.float16) else 1e-5
        rescale = not bool(torch.allclose(norms, torch.ones_like(norms), atol=tol, rtol=0))
        if rescale:  # only a plain TopK SAE (or plain JumpReLU) gets here: weighted ones are folded
            W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
            threshold = threshold * norms
        self.W_enc = nn.Parameter(W_enc.t().contiguous().to(dt))
        self.b_enc = nn.Parameter(b_enc.to(dt))
        self.W_dec = nn.Parameter(W_dec.to(dt))
        self.b_dec = nn.Parameter(f["b_dec"].clone())
        self.activation = c.activation
        self.register_buffer("k", torch.tensor(c.k, dtype=torch.int64, device=dev))
        self.register_buffer("threshold", threshold.to(dt))
        # Selection of a rescaled plain TopK: by value / norm, i.e. by the original relu(pre).
        self.register_buffer("select_scale", (1.0 / norms).to(dt) if rescale and c.activation == "topk" else None)
        self.device: torch.device = dev
        self.dtype: torch.dtype = dt
        relu = c.activation == "jumprelu" and bool((threshold == 0).all())
        self.cfg = _config_class()(model_name, d_in=d, d_sae=n, hook_layer=hook_layer, hook_name=hook_name)
        self.cfg.architecture = "topk" if c.activation == "topk" else ("standard" if relu else "jumprelu")
        self.cfg.architecture_str = self.cfg.architecture  # what SAEBench's evaluations read (set by its loader too)
        self.cfg.activation_fn_str = "topk" if c.activation == "topk" else "relu"
        self.cfg.activation_fn_kwargs = {"k": c.k} if c.activation == "topk" else {}
        self.cfg.model_from_pretrained_kwargs = {}
        self.cfg.apply_b_dec_to_input = False
        self.cfg.finetuning_scaling_factor = False
        self.cfg.normalize_activations = "none"
        self.cfg.context_size = context_size
        self.cfg.dtype = _dtype_name(dt)
        self.cfg.device = str(dev)
        self.hook_z_reshaping_mode = c.reshape_activations == "hook_z"
        self._d_head: Optional[int] = None

    # -------------------------------------------------------------- SAEBench's contract

    def encode(self, x: Tensor) -> Tensor:
        """``x [..., d_in]`` (``[..., n_heads, d_head]`` in hook_z mode) -> dense latents ``[..., d_sae]``."""
        check_tensor("x", x, device=self.W_enc.device)
        d = self.W_enc.shape[0]
        if self.hook_z_reshaping_mode and x.dim() >= 2 and x.shape[-1] != d and x.shape[-2] * x.shape[-1] == d:
            self._d_head = x.shape[-1]
            x = x.flatten(-2)
        if x.shape[-1] != d:
            raise ValueError(f"x: expected shape [..., {d}] (d_in), got {list(x.shape)}")
        z = torch.relu(x.to(self.W_enc.dtype) @ self.W_enc + self.b_enc)
        if self.activation == "jumprelu":
            return z * (z > self.threshold)
        score = z if self.select_scale is None else z * self.select_scale
        idx = score.topk(int(self.k), dim=-1).indices
        return torch.zeros_like(z).scatter(-1, idx, z.gather(-1, idx))

    def decode(self, feature_acts: Tensor) -> Tensor:
        """Dense latents ``[..., d_sae]`` -> reconstruction ``[..., d_in]`` (heads restored in hook_z mode)."""
        check_tensor("feature_acts", feature_acts, device=self.W_dec.device)
        if feature_acts.shape[-1] != self.W_dec.shape[0]:
            raise ValueError(
                f"feature_acts: expected shape [..., {self.W_dec.shape[0]}] (d_sae), got {list(feature_acts.shape)}"
            )
        out = feature_acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        if self.hook_z_reshaping_mode and self._d_head is not None:
            out = out.unflatten(-1, (-1, self._d_head))
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def check_decoder_norms(self) -> bool:
        """True when every decoder row has unit norm (SAEBench's tolerance: 1e-5, 1e-2 in 16-bit)."""
        norms = self.W_dec.float().norm(dim=1)
        tol = 1e-2 if self.W_dec.dtype in (torch.bfloat16, torch.float16) else 1e-5
        return bool(torch.allclose(norms, torch.ones_like(norms), atol=tol))

    def turn_on_forward_pass_hook_z_reshaping(self) -> None:
        self.hook_z_reshaping_mode = True

    def turn_off_forward_pass_hook_z_reshaping(self) -> None:
        self.hook_z_reshaping_mode = False
        self._d_head = None

    def _apply(self, *args, **kwargs):  # .to(), .cuda(), .half(), ... keep device / dtype / cfg in step
        out = super()._apply(*args, **kwargs)
        self.device, self.dtype = self.W_enc.device, self.W_enc.dtype
        self.cfg.device, self.cfg.dtype = str(self.device), _dtype_name(self.dtype)
        return out


def to_saebench(sae, model_name: Optional[str] = None, hook_layer: Optional[int] = None,
                hook_name: Optional[str] = None, context_size: Optional[int] = None) -> SAEBenchSAE:
    c = sae.cfg
    model_name = model_name if model_name is not None else c.model_name
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(
            "model_name: SAEBench needs the name of the model the SAE reads (e.g. 'gemma-2-2b'); "
            f"cfg.model_name is {c.model_name!r}: pass to_saebench(model_name=...)"
        )
    if c.hook_point_out is not None and c.hook_point_in is not None and c.hook_point_out != c.hook_point_in:
        raise ValueError(
            f"sae: a transcoder ({c.hook_point_in} -> {c.hook_point_out}); SAEBench evaluates SAEs that "
            "reconstruct the activation they read"
        )
    hook_name = hook_name if hook_name is not None else c.hook_point_in
    if hook_layer is None:
        hook_layer = c.layer
    if hook_layer is None and hook_name is not None:
        hook_layer = hook_layer_of(hook_name)
    if hook_layer is None:
        raise ValueError(
            "hook_layer: SAEBench needs the layer the SAE reads; the SAE's cfg has no layer or "
            "TransformerLens hook name: pass to_saebench(hook_layer=...)"
        )
    hook_layer = as_int("hook_layer", hook_layer)
    if hook_layer < 0:
        raise ValueError(f"hook_layer: expected a non-negative integer, got {hook_layer}")
    if hook_name is None:
        hook_name = f"blocks.{hook_layer}.hook_resid_post"
    if not isinstance(hook_name, str):
        raise ValueError(f"hook_name: expected a string, got {hook_name!r}")
    if context_size is not None:
        context_size = as_int("context_size", context_size)
    return SAEBenchSAE(sae, model_name, hook_layer, hook_name, context_size)
