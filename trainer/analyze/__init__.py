"""``python -m trainer.analyze``: what SAEs learned (top contexts, statistics, logit effects, a static
dashboard) and feature geometry across two SAEs (``compare``). ``python -m trainer.evaluate`` (the same
SAE on other models, data and context lengths) lives in ``trainer.evaluate`` and reads runs through
``runs``."""
from .runs import Member, RunError, resolve_run

__all__ = ["Member", "RunError", "resolve_run"]
