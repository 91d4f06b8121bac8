"""``SAEConfig``: everything needed to rebuild a ``TopKSAE`` besides its tensors."""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from ._validate import as_int

ACTIVATIONS = ("topk", "jumprelu")
RESHAPES = ("none", "hook_z")
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
POSITIONS = ("R", "A", "M", "TC")


@dataclass
class SAEConfig:
    """Shape and semantics of a TopK SAE.

    Attributes:
        d_model: width of the activations the SAE reads.
        d_sae: number of latents.
        k: latents kept per token (activation "topk"; also the target L0 of a JumpReLU conversion).
        weighted_topk: select by ``relu(pre) * ||W_dec[i]||`` (Llama Scope) instead of ``relu(pre)``.
            The JumpReLU gate compares the same weighted score with the threshold.
        activation: "topk" or "jumprelu" (per-latent thresholds in the module's ``threshold`` buffer).
        dtype: parameter dtype, one of float32, bfloat16, float16, float64.
        norm_in: ``s_in``: the encoder reads ``norm_in * x`` (dataset-wise normalisation, docs/method.md sec. 3).
        norm_out: ``s_out``: the decoder output is divided by ``norm_out`` to return to raw units.
        hook_point_in / hook_point_out: TransformerLens-style names of where the SAE reads / writes.
        model_name, layer, position: provenance of the activations (position in R, A, M, TC).
        reshape_activations: "none", or "hook_z" for an SAE on attention heads' outputs (TransformerLens
            ``hook_z``, ``[..., n_heads, d_head]``): the module flattens the last two dimensions of
            its input (``n_heads * d_head == d_model``) and ``forward`` returns the input's shape.
    """

    d_model: int
    d_sae: int
    k: int = 50
    weighted_topk: bool = True
    activation: str = "topk"
    dtype: str = "float32"
    norm_in: float = 1.0
    norm_out: float = 1.0
    hook_point_in: Optional[str] = None
    hook_point_out: Optional[str] = None
    model_name: Optional[str] = None
    layer: Optional[int] = None
    position: Optional[str] = None
    reshape_activations: str = "none"

    def __post_init__(self) -> None:
        for name in ("d_model", "d_sae", "k"):
            v = getattr(self, name)
            try:
                v = as_int(name, v)  # numpy and torch integers are ints too
            except ValueError:
                raise ValueError(f"{name}: expected a positive int, got {v!r}") from None
            if v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
            setattr(self, name, v)
        if self.k > self.d_sae:
            raise ValueError(f"k: expected 1 <= k <= d_sae={self.d_sae}, got {self.k}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {self.activation!r}")
        if isinstance(self.dtype, torch.dtype):
            self.dtype = str(self.dtype).replace("torch.", "")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {self.dtype!r}")
        for name in ("norm_in", "norm_out"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name}: expected a finite positive number, got {v!r}")
            setattr(self, name, float(v))
        if not isinstance(self.weighted_topk, bool):
            raise ValueError(f"weighted_topk: expected a bool, got {self.weighted_topk!r}")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"position: expected one of {POSITIONS} or None, got {self.position!r}")
        if self.layer is not None:
            try:
                layer = as_int("layer", self.layer)
            except ValueError:
                layer = -1
            if layer < 0:
                raise ValueError(f"layer: expected a non-negative int or None, got {self.layer!r}")
            self.layer = layer
        if self.reshape_activations not in RESHAPES:
            raise ValueError(f"reshape_activations: expected one of {RESHAPES}, got {self.reshape_activations!r}")
        for name in ("hook_point_in", "hook_point_out", "model_name"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{name}: expected a string or None, got {v!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def expansion(self) -> float:
        return self.d_sae / self.d_model

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any], source: str = "config") -> "SAEConfig":
        """Build from ``to_dict()``'s output. Unknown keys are an error (a misspelt ``weighted_topk``
        must not silently fall back to its default); ``source`` names the file in messages."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in names]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(str(k), names, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"{source}: unknown keys {', '.join(hints)}; expected keys from {names}")
        missing = [n for n in ("d_model", "d_sae") if n not in d]
        if missing:
            raise ValueError(f"{source}: missing required keys {missing}")
        try:
            return cls(**d)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def replace(self, **changes: Any) -> "SAEConfig":
        return dataclasses.replace(self, **changes)
