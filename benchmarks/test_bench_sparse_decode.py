"""sparse_decode (k rows of W_dec per token + b_dec): forward, backward, full.

Dense: ``f @ W_dec + b_dec`` with the dense N x d_sae latents. sparsify: its decoder
(``embedding_bag``; Triton on CUDA). Full = + Adam on W_dec, b_dec.
"""
import pytest

from providers import MODES, PROVIDERS, SHAPES, run


# Provider varies fastest: the providers of one (shape, mode) run back to back, under the same load.
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
def test_sparse_decode(benchmark, machine, shape, mode, provider):
    run(benchmark, machine(shape), "sparse_decode", provider, mode, shape)
