"""sae-kernels trainer: produce LM activations and train Llama Scope SAEs on them.

``python -m trainer.run`` trains, evaluates and exports an SAE end to end (see trainer/run.py).
Public pieces: ``TrainConfig``, ``load_model``, ``capture`` / ``run_capture`` (read an activation of a
Hugging Face model), ``splice_sae`` / ``zero_ablate`` / ``replace_activation`` (replace one).
"""
import os as _os

# The activation producer runs LM forwards on a second thread. With GNU OpenMP's default (spinning)
# wait policy, two threads' OpenMP teams on a small CPU starve each other: a tiny-Llama forward went
# from 26 ms to 376 ms after a producer thread had run, and 2.9 s vs 11.6 s for a whole tiny
# pipeline (2 cores). Passive waiting fixes it; it must be set before torch loads libgomp, and an
# explicit user setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import TrainConfig
from .data.lm import capture, load_model, replace_activation, run_capture, splice_sae, zero_ablate

__all__ = ["TrainConfig", "load_model", "capture", "run_capture", "replace_activation", "splice_sae", "zero_ablate"]
