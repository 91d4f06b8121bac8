"""``TopKSAE``: a drop-in TopK sparse autoencoder module built on the fused ops.

Conventions (docs/method.md sec. 2, 3 and 5):

* Parameters are latent-major: ``W_enc [d_sae, d_model]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_model]``,
  ``b_dec [d_model]``; the buffer ``threshold [d_sae]`` holds the JumpReLU thresholds, in the
  parameters' dtype (the gate compares in that dtype, and checkpoints keep it exactly).
* The module takes and returns *raw* activations: it encodes ``norm_in * x`` and divides the decoder
  output by ``norm_out`` (dataset-wise normalisation). ``fold_dataset_norm`` removes the factors.
* The selection (TopK) and the gate (JumpReLU) compare the score ``relu(pre) * ||W_dec[i]||`` when
  ``weighted_topk`` is on, ``relu(pre)`` otherwise; the latent value kept is always ``relu(pre)``.

The fold maths live in ``sae_kernels.fold`` and the checkpoint formats in ``sae_kernels.formats``, both
on ``(cfg, tensors)``: the module hands them its ``state_dict()`` and builds itself from what they return
(``TopKSAE.from_state``).
"""
from __future__ import annotations

import copy
import math
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import formats, saebench
from ._validate import as_int, check_finite, check_k, check_tensor
from .config import DTYPES, SAEConfig
from .fold import fold_dataset_norm, fold_decoder_norm, folded as folded_state
from .ops import decode_selected, sparse_decode, topk_encode

PathLike = Union[str, "os.PathLike[str]"]  # noqa: F821


class TopKSAE(nn.Module):
    """TopK SAE with decoder-norm-weighted selection (Llama Scope), or a JumpReLU SAE.

    Args:
        cfg: the ``SAEConfig``.
        transcoder: initialise the encoder independently of the decoder (docs/method.md sec. 2).
        device: where to allocate the parameters.
        init: run the Llama Scope initialisation (turn off when the tensors will be loaded).

    Attributes:
        check_inputs: reject NaN/Inf inputs with a ValueError (default True; one host sync per call,
            so training loops that validate their data set it to False).
    """

    def __init__(
        self,
        cfg: SAEConfig,
        *,
        transcoder: bool = False,
        device: Optional[Union[str, torch.device]] = None,
        init: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(cfg, SAEConfig):
            raise ValueError(f"cfg: expected an SAEConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        n, d, dt = cfg.d_sae, cfg.d_model, cfg.torch_dtype
        self.W_enc = nn.Parameter(torch.empty(n, d, dtype=dt, device=device))
        self.b_enc = nn.Parameter(torch.zeros(n, dtype=dt, device=device))
        self.W_dec = nn.Parameter(torch.empty(n, d, dtype=dt, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d, dtype=dt, device=device))
        self.register_buffer("threshold", torch.zeros(n, dtype=dt, device=device))
        self.check_inputs = True
        if init:
            self.reset_parameters(transcoder=transcoder)
        else:
            nn.init.zeros_(self.W_enc)
            nn.init.zeros_(self.W_dec)

    # ------------------------------------------------------------------ init and properties

    @torch.no_grad()
    def reset_parameters(self, transcoder: bool = False, row_norm: float = 0.5) -> None:
        """Decoder rows Kaiming-uniform rescaled to ``row_norm``; encoder = decoder (or independent
        with the same row norm for a transcoder); biases zero. Uses torch's global RNG."""

        def rows(shape):
            w = torch.empty(shape, dtype=torch.float32, device=self.W_dec.device)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            return w * (row_norm / w.norm(dim=1, keepdim=True).clamp_min(1e-12))

        w_dec = rows(self.W_dec.shape)
        self.W_dec.copy_(w_dec)
        self.W_enc.copy_(rows(self.W_enc.shape) if transcoder else w_dec)
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.threshold.zero_()

    @property
    def d_model(self) -> int:
        return self.cfg.d_model

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def device(self) -> torch.device:
        """Where the parameters live."""
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (``cfg.dtype`` as a torch dtype, unless the module was cast since)."""
        return self.W_enc.dtype

    def dec_norm(self) -> Tensor:
        """Decoder row norms ``||W_dec[i]||`` (detached, fp32 accumulation, parameter dtype)."""
        W = self.W_dec.detach()
        return W.float().norm(dim=1).to(W.dtype)

    def _score_weight(self) -> Optional[Tensor]:
        return self.dec_norm() if self.cfg.weighted_topk else None

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"d_model={c.d_model}, d_sae={c.d_sae}, k={c.k}, activation={c.activation}, "
            f"weighted_topk={c.weighted_topk}, dtype={c.dtype}, norm_in={c.norm_in:g}, norm_out={c.norm_out:g}"
        )

    # ------------------------------------------------------------------ forward pieces

    def _flatten_heads(self, x: Tensor) -> Tensor:
        """hook_z SAEs read ``[..., n_heads, d_head]`` and work on ``[..., n_heads * d_head]``."""
        d = self.cfg.d_model
        if (self.cfg.reshape_activations == "hook_z" and x.dim() >= 2 and x.shape[-1] != d
                and x.shape[-2] * x.shape[-1] == d):
            return x.flatten(-2)
        return x

    def _prep(self, x: Tensor) -> Tensor:
        check_tensor("x", x, device=self.W_enc.device)
        x = self._flatten_heads(x)
        if x.dim() < 1 or x.shape[-1] != self.cfg.d_model:
            heads = " or [..., n_heads, d_head] with n_heads * d_head = d_model" \
                if self.cfg.reshape_activations == "hook_z" else ""
            raise ValueError(
                f"x: expected shape [..., {self.cfg.d_model}] (d_model){heads}, got {list(x.shape)}"
            )
        if self.check_inputs:
            check_finite("x", x)
        x = x.to(self.W_enc.dtype)
        return x * self.cfg.norm_in if self.cfg.norm_in != 1.0 else x

    def _k(self, k: Optional[int]) -> int:
        return self.cfg.k if k is None else check_k(k, self.cfg.d_sae)

    def _jumprelu_dense(self, x_n: Tensor) -> Tensor:
        z = torch.relu(x_n @ self.W_enc.t() + self.b_enc)
        w = self._score_weight()
        score = z if w is None else z * w
        return z * (score > self.threshold.to(z.dtype))

    def encode_sparse(self, x: Tensor, k: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """Raw ``x [..., d_model]`` -> ``(values, indices)`` of shape ``[..., k]``.

        ``k`` overrides ``cfg.k`` (TopK; K-annealing). For a JumpReLU SAE the rows are padded with
        zero values up to the largest number of active latents in the batch (one host sync).
        """
        x_n = self._prep(x)
        if self.cfg.activation == "topk":
            return topk_encode(
                x_n, self.W_enc, self.b_enc, self._k(k), self._score_weight(), check_finite_input=False
            )
        f = self._jumprelu_dense(x_n)
        width = max(1, int((f > 0).sum(-1).max())) if f.numel() else 1
        values, indices = torch.topk(f, width, dim=-1)
        return values, indices

    def encode(self, x: Tensor, k: Optional[int] = None) -> Tensor:
        """Raw ``x [..., d_model]`` -> dense latent activations ``[..., d_sae]`` (zeros off the support)."""
        if self.cfg.activation == "jumprelu":
            return self._jumprelu_dense(self._prep(x))
        values, indices = self.encode_sparse(x, k)
        out = torch.zeros(*values.shape[:-1], self.cfg.d_sae, dtype=values.dtype, device=values.device)
        return out.scatter(-1, indices, values)

    def decode_sparse(self, values: Tensor, indices: Tensor, *, check_indices: bool = True) -> Tensor:
        """``(values, indices) [..., k]`` -> raw-space reconstruction ``[..., d_model]``."""
        out = sparse_decode(values, indices, self.W_dec, self.b_dec, check_indices=check_indices)
        return out / self.cfg.norm_out if self.cfg.norm_out != 1.0 else out

    def decode(self, f: Tensor) -> Tensor:
        """Dense latents ``[..., d_sae]`` -> raw-space reconstruction ``[..., d_model]``."""
        check_tensor("f", f, device=self.W_dec.device)
        if f.dim() < 1 or f.shape[-1] != self.cfg.d_sae:
            raise ValueError(f"f: expected shape [..., {self.cfg.d_sae}] (d_sae), got {list(f.shape)}")
        out = f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        return out / self.cfg.norm_out if self.cfg.norm_out != 1.0 else out

    def forward(self, x: Tensor, k: Optional[int] = None) -> Tensor:
        """Reconstruction of raw ``x [..., d_model]`` in raw units, in ``x``'s dtype and shape (a hook_z
        SAE given ``[..., n_heads, d_head]`` returns that shape)."""
        values, indices = self.encode_sparse(x, k)
        out = decode_selected(values, indices, self.W_dec, self.b_dec)  # just selected: no range check, no sync
        out = (out / self.cfg.norm_out if self.cfg.norm_out != 1.0 else out).to(x.dtype)
        return out.reshape(x.shape) if out.shape != x.shape else out

    # ------------------------------------------------------------------ state and folding (docs/method.md sec. 3 and 5)

    @classmethod
    @torch.no_grad()
    def from_state(
        cls,
        cfg: SAEConfig,
        tensors: Dict[str, Tensor],
        dtype: Optional[str] = None,
        device: Optional[Union[str, torch.device]] = None,
    ) -> "TopKSAE":
        """A module holding ``tensors`` (``W_enc [d_sae, d_model]``, ``b_enc``, ``W_dec [d_sae, d_model]``,
        ``b_dec`` and optionally ``threshold``, a ``[d_sae]`` tensor or a scalar; zeros when absent), as
        ``formats``' readers and ``state_dict()`` give them. The parameters are ``dtype`` (a name; default
        ``cfg.dtype``, and ``cfg.dtype`` becomes ``dtype``), each tensor cast once, on ``device``."""
        if not isinstance(cfg, SAEConfig):
            raise ValueError(f"cfg: expected an SAEConfig, got {type(cfg).__name__}")
        if dtype is not None:
            if dtype not in DTYPES:
                raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {dtype!r}")
            cfg = cfg.replace(dtype=dtype)
        sae = cls(cfg, init=False, device=device)
        sae._assign(cfg, tensors)
        return sae

    @torch.no_grad()
    def _assign(self, cfg: SAEConfig, tensors: Dict[str, Tensor]) -> None:
        """Copy ``tensors`` into the parameters and buffer (cast to their dtype) and set ``cfg``."""
        n, d = cfg.d_sae, cfg.d_model
        shapes = {"W_enc": (n, d), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}
        for name, shape in shapes.items():
            t = tensors.get(name)
            if not isinstance(t, Tensor):
                raise ValueError(f"tensors: expected a tensor {name!r} of shape {list(shape)}, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(f"tensors: {name}: expected shape {list(shape)}, got {list(t.shape)}")
            getattr(self, name).copy_(t)
        th = tensors.get("threshold")
        if th is None:
            self.threshold.zero_()
        else:
            th = torch.as_tensor(th)
            if th.dim() > 1 or th.numel() not in (1, n):
                raise ValueError(f"tensors: threshold: expected shape [{n}] or a scalar, got {list(th.shape)}")
            self.threshold.copy_(th.reshape(-1).expand(n))
        self.cfg = cfg

    @torch.no_grad()
    def fold_dataset_norm(self) -> "TopKSAE":
        """Fold ``norm_in`` / ``norm_out`` into the parameters, in place (then both are 1).

        ``b_enc /= s_in``, ``b_dec /= s_out``, ``W_dec *= s_in / s_out``; the latent values scale by
        ``1 / s_in`` and the JumpReLU thresholds follow the score (``1 / s_out`` weighted, else ``1 / s_in``).
        See ``sae_kernels.fold.fold_dataset_norm``.
        """
        if self.cfg.norm_in == 1.0 and self.cfg.norm_out == 1.0:
            return self
        self._assign(*fold_dataset_norm(self.cfg, self.state_dict()))
        return self

    @torch.no_grad()
    def fold_decoder_norm(self) -> "TopKSAE":
        """Move the decoder row norms into the encoder, in place (docs/method.md sec. 5 step 1).

        ``W_enc[i] *= n_i``, ``b_enc[i] *= n_i``, ``W_dec[i] /= n_i``: the latent value becomes the
        weighted score, so selection and gate are unchanged while ``weighted_topk`` turns off.
        Needs ``weighted_topk``: on a plain TopK SAE the fold would change which latents win.
        See ``sae_kernels.fold.fold_decoder_norm``.
        """
        self._assign(*fold_decoder_norm(self.cfg, self.state_dict()))
        return self

    def folded(self) -> "TopKSAE":
        """A copy with dataset norm and (if weighted) decoder norms folded: takes raw activations,
        unit-norm decoder rows, latent values equal to the Llama Scope inference activations
        (``sae_kernels.fold.folded``)."""
        out = copy.deepcopy(self)
        out._assign(*folded_state(self.cfg, self.state_dict()))
        return out

    @torch.no_grad()
    def to_jumprelu(self, activations: Tensor, k: Optional[int] = None, batch_size: int = 4096) -> "TopKSAE":
        """Post-process into a JumpReLU SAE (docs/method.md sec. 5); returns a new, folded module.

        ``activations [N, d_model]``: raw activations of non-special tokens (32,768 in the recipe).
        The shared threshold ``theta`` is the ``(N * k)``-th largest folded pre-activation
        ``h' = relu(W_enc x + b_enc)`` over the batch, so the mean L0 on it is exactly ``k``
        (barring ties at ``theta``). Latents fire when ``h'_i > theta``.
        """
        k = self._k(k)
        check_tensor("activations", activations, ndim=2, device=self.W_enc.device)
        if activations.shape[1] != self.cfg.d_model:
            raise ValueError(
                f"activations: expected shape [N, {self.cfg.d_model}], got {list(activations.shape)}"
            )
        N = activations.shape[0]
        if N < 1:
            raise ValueError("activations: expected at least one token")
        check_finite("activations", activations)  # a NaN would make theta NaN: no latent would ever fire
        try:
            bs = as_int("batch_size", batch_size)
        except ValueError:
            bs = 0
        if bs < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        batch_size = bs
        out = self.folded()
        out.cfg = out.cfg.replace(activation="topk", k=k)
        total = N * k
        pool = None  # the `total` largest h' seen so far (never more than N * k values)
        acc = torch.float64 if out.W_enc.dtype == torch.float64 else torch.float32
        for s in range(0, N, batch_size):
            x = activations[s : s + batch_size].to(out.W_enc.dtype)
            h = torch.relu(x @ out.W_enc.t() + out.b_enc).to(acc).reshape(-1)
            cand = h if pool is None else torch.cat([pool, h])
            pool = torch.topk(cand, min(total, cand.numel()), sorted=False).values
        theta = float(pool.min())
        out.cfg = out.cfg.replace(activation="jumprelu")
        out.threshold.fill_(theta)
        return out

    # ------------------------------------------------------------------ formats (see sae_kernels.formats)

    def save(self, path: PathLike) -> None:
        """Our format: ``path/config.json`` + ``path/sae.safetensors`` (written atomically)."""
        formats.write_sae(self.cfg, self.state_dict(), path)

    @classmethod
    def load(cls, path: PathLike, device: Optional[Union[str, torch.device]] = None) -> "TopKSAE":
        """Load a folder written by ``save``. A folder in another format (Llama Scope, SAELens,
        sparsify) is refused with a pointer to its loader (``from_llama_scope``, ...)."""
        cfg, tensors = formats.read_sae(path)
        return cls.from_state(cfg, tensors, device=device)

    @classmethod
    def from_llama_scope(
        cls,
        path_or_repo: PathLike,
        name: Optional[str] = None,
        *,
        fold: bool = True,
        dtype: Optional[str] = "float32",
        device: Optional[Union[str, torch.device]] = None,
    ) -> "TopKSAE":
        """Load a released Llama Scope SAE (a local folder, or a Hub repo id plus SAE name).

        ``fold=True`` (default) reproduces the method's inference exactly: dataset norms folded, then
        decoder norms folded into the encoder, then the scalar ``jump_relu_threshold`` (act_fn
        jumprelu) or TopK (act_fn topk) on the folded pre-activations. ``fold=False`` keeps the raw
        training state (normalised space, weighted selection) for further training.
        """
        cfg, tensors = formats.read_llama_scope(path_or_repo, name, fold=fold)
        return cls.from_state(cfg, tensors, dtype=dtype, device=device)

    def to_llama_scope(
        self, path: PathLike, hyperparams: Optional[dict] = None, lm_config: Optional[dict] = None,
        dtype: Optional[str] = None,
    ) -> None:
        """Write the released Llama Scope layout (hyperparams.json, lm_config.json,
        checkpoints/final.safetensors); tensors in ``dtype`` (default: the module's)."""
        formats.write_llama_scope(self.cfg, self.state_dict(), path, hyperparams=hyperparams,
                                  lm_config=lm_config, dtype=dtype)

    @classmethod
    def from_saelens(cls, path: PathLike, device=None, dtype: Optional[str] = None) -> "TopKSAE":
        """Load a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``, SAELens 6 or earlier):
        architectures standard, jumprelu, gated, topk (with ``rescale_acts_by_decoder_norm``),
        batchtopk and matryoshka_batchtopk training checkpoints (as the JumpReLU SAE SAELens exports
        from them), and transcoder / jumprelu_transcoder when ``d_in == d_out``. Its latents equal
        SAELens's ``encode``: with ``rescale_acts_by_decoder_norm`` the SAE is loaded with weighted
        selection and then folded (unit-norm decoder rows); ``apply_b_dec_to_input`` (SAELens's default:
        true) is folded into ``b_enc``. Others (abstopk, skip transcoders, temporal, matching_pursuit,
        ``normalize_activations`` other than "none") are refused with the reason."""
        cfg, tensors = formats.read_saelens(path)
        return cls.from_state(cfg, tensors, dtype=dtype, device=device)

    def to_saelens(self, path: PathLike) -> None:
        """Write SAELens 6's layout from a folded copy: architecture topk or jumprelu (standard when
        every threshold is 0), metadata with model_name, hook_name, hook_layer."""
        formats.write_saelens(self.cfg, self.state_dict(), path)

    @classmethod
    def from_sparsify(cls, path: PathLike, device=None, dtype: Optional[str] = None) -> "TopKSAE":
        """Load an EleutherAI sparsify folder (``cfg.json`` + ``sae.safetensors``)."""
        cfg, tensors = formats.read_sparsify(path)
        return cls.from_state(cfg, tensors, dtype=dtype, device=device)

    def to_sparsify(self, path: PathLike) -> None:
        """Write EleutherAI sparsify's layout (read by ``sparsify.SparseCoder.load_from_disk``) from a
        folded copy; TopK SAEs only (sparsify has no JumpReLU)."""
        formats.write_sparsify(self.cfg, self.state_dict(), path)

    def to_saebench(
        self, model_name: Optional[str] = None, hook_layer: Optional[int] = None,
        hook_name: Optional[str] = None, context_size: Optional[int] = None,
    ) -> nn.Module:
        """A module meeting SAEBench's ``BaseSAE`` contract (``W_enc [d_in, d_sae]``, unit-norm decoder
        rows, ``device`` / ``dtype`` attributes, a ``cfg`` with ``d_in``, ``hook_name``, ``hook_layer``,
        ``architecture``, ...), whose ``encode`` / ``decode`` / ``forward`` equal this SAE's folded
        copy. Defaults come from ``cfg`` (``model_name``, ``layer``, ``hook_point_in``). See
        ``sae_kernels.saebench``; sae_bench itself is imported only when it is installed."""
        return saebench.to_saebench(self, model_name=model_name, hook_layer=hook_layer, hook_name=hook_name,
                                    context_size=context_size)
