"""The evaluation metrics (docs/method.md sec. 6) against their formulas, in float64."""

import pytest
import torch

from sae_kernels import SAEConfig, TopKSAE
from trainer.evaluate import sae_metrics


def test_sae_metrics_match_the_formulas():
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(16, 64, k=5))
    x = torch.randn(300, 16) * 2 + 0.5
    m = sae_metrics(sae, x, batch_size=77)
    with torch.no_grad():
        v, i = sae.encode_sparse(x)
        xh = sae.decode_sparse(v, i).double()
    xd = x.double()
    err = (xd - xh).pow(2).sum(-1)
    var = (xd - xd.mean(0)).pow(2).sum(-1)
    assert m["explained_variance"] == pytest.approx(float(1 - err.sum() / var.sum()), abs=1e-9)
    assert m["explained_variance_per_token"] == pytest.approx(float((1 - err / var).mean()), abs=1e-9)
    assert m["l0"] == pytest.approx(float((v > 0).sum(-1).double().mean()))
    fired = torch.zeros(64, dtype=torch.bool)
    fired[i[v > 0]] = True
    assert m["dead_latents_eval"] == int((~fired).sum()) and m["n_tokens"] == 300
