"""``python -m trainer.analyze``: what SAEs learned (top contexts, statistics, logit effects, a static
dashboard), feature geometry across two SAEs (``compare``), and ``python -m trainer.evaluate``'s
evaluation of a trained SAE on other models, data and context lengths (``evaluate_run``)."""
from .runs import Member, RunError, resolve_run

__all__ = ["Member", "RunError", "resolve_run"]
