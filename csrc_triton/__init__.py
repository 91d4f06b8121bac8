"""Raw @triton.jit kernels of sae-kernels (no torch.autograd here; launchers live in sae_kernels.triton_ops)."""

from csrc_triton.sparse_decode import _gather_dot_kernel, _gather_rows_kernel, _scatter_outer_kernel
from csrc_triton.topk_encode import (
    _encode_scores_kernel,
    _encode_topk_candidates_kernel,
    _select_candidates_kernel,
)

__all__ = [
    "_encode_scores_kernel",
    "_encode_topk_candidates_kernel",
    "_gather_dot_kernel",
    "_gather_rows_kernel",
    "_scatter_outer_kernel",
    "_select_candidates_kernel",
]
