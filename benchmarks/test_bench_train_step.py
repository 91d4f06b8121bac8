"""The whole SAE training step: encode, decode, FVU loss; backward; fused Adam over all parameters.

Dense: ``reference.dense_topk_sae``. torch / triton: the ``TopKSAE`` module on that backend.
sparsify: ``SparseCoder`` (it subtracts b_dec before encoding and selects without decoder-norm
weighting, one N x d_sae elementwise pass less than ours).
"""
import pytest

from providers import MODES, PROVIDERS, SHAPES, run, run_interleaved


# Provider varies fastest: the providers of one (shape, mode) run back to back, under the same load.
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
def test_train_step(benchmark, machine, shape, mode, provider):
    run(benchmark, machine(shape), "train_step", provider, mode, shape)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
def test_train_step_interleaved(benchmark, machine, shape):
    """The headline: full steps of every provider with rounds interleaved, so all see the same load."""
    run_interleaved(benchmark, machine(shape), "train_step", "full", shape)
