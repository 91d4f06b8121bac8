"""Raw @triton.jit kernels of sae-kernels (no torch.autograd here; launchers live in sae_kernels.triton_ops)."""

from csrc_triton.adam import _adam_kernel
from csrc_triton.loss import _row_sq_error_kernel
from csrc_triton.sparse_decode import _gather_dot_kernel, _gather_rows_kernel, _scatter_rows_kernel
from csrc_triton.topk_encode import _encode_topk_candidates_kernel, _select_candidates_kernel
from csrc_triton.topk_select import _row_topk_kernel

__all__ = [
    "_adam_kernel",
    "_encode_topk_candidates_kernel",
    "_gather_dot_kernel",
    "_gather_rows_kernel",
    "_row_sq_error_kernel",
    "_row_topk_kernel",
    "_scatter_rows_kernel",
    "_select_candidates_kernel",
]
