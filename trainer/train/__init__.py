"""Training: the step every layout runs, the loop around a run's members, and what makes a run resumable.

* ``step``: ``SAEStep`` (one optimiser step of Llama Scope's recipe over a ``ParallelContext``),
  ``StepConfig``, ``make_optimizer``, the losses, ``estimate_norm``.
* ``loop``: ``Member`` (one SAE of a run) and ``Trainer`` (the loop, logging, checkpoints, signals).
* ``schedules``: K-annealing and the learning-rate factor.
* ``checkpoint``: the resume files, written atomically and read without unpickling code.
* ``stop``: SIGTERM and Ctrl-C at a step boundary.
"""
from .checkpoint import CheckpointError, CheckpointWriteError
from .loop import Diverged, Member, StopTraining, Trainer
from .schedules import default_warmup, k_schedule, lr_factor
from .step import SAEStep, StepConfig, estimate_norm, fvu_loss, llama_scope_loss, make_optimizer
from .stop import Interrupted

__all__ = ["SAEStep", "StepConfig", "make_optimizer", "estimate_norm", "llama_scope_loss", "fvu_loss", "Member",
           "Trainer", "StopTraining", "Diverged", "Interrupted", "CheckpointError", "CheckpointWriteError", "k_schedule",
           "lr_factor", "default_warmup"]
