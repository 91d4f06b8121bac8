"""Evaluation of trained SAEs (docs/method.md sec. 6).

* ``metrics``: explained variance, L0, dead latents, delta LM loss and CE score on held-out contexts,
  every SAE of a site from one clean LM pass (``evaluate_sites``); what a run writes to ``eval.json``.
* ``cli``: ``python -m trainer.evaluate RUN``: a trained SAE on other models, data and context lengths.
"""
from .metrics import EV_CONVENTION, ce_by_position, collect, collect_sites, evaluate_sites, position_bucket, sae_metrics

__all__ = ["EV_CONVENTION", "evaluate_sites", "collect", "collect_sites", "sae_metrics", "position_bucket",
           "ce_by_position"]
