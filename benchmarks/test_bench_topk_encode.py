"""topk_encode (encoder GEMM + bias + ReLU + decoder-norm-weighted top-k): forward, backward, full.

Dense: linear, ReLU, weighted top-k, scatter to a dense mask (the first half of ``dense_topk_sae``).
sparsify: its ``fused_encoder`` (plain top-k, index_add backward). Full = + Adam on W_enc, b_enc.
"""
import pytest

from providers import MODES, PROVIDERS, SHAPES, run


# Provider varies fastest: the providers of one (shape, mode) run back to back, under the same load.
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
def test_topk_encode(benchmark, machine, shape, mode, provider):
    run(benchmark, machine(shape), "topk_encode", provider, mode, shape)
