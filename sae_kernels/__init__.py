"""sae-kernels: fast, exact TopK sparse autoencoders (Llama Scope's method) on fused Triton kernels.

>>> from sae_kernels import TopKSAE, SAEConfig, topk_encode, sparse_decode
"""
from .backend import choose_backend
from .config import SAEConfig
from .ops import sparse_decode, topk_encode
from .sae import TopKSAE

__all__ = ["TopKSAE", "SAEConfig", "topk_encode", "sparse_decode", "choose_backend"]
__version__ = "0.1.0"
