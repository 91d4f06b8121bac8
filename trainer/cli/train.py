"""``python -m trainer.run``'s flags: one per ``TrainConfig`` field, with its help and its default.

Settings whose default depends on the model show both families: the embedded default's and the
Llama Scope recipe's (every other model).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Dict

from ..config import EMBEDDED_DEFAULTS, RECIPE_DEFAULTS, TrainConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.run",
        description="Train Llama Scope TopK SAEs (or transcoders) on a causal LM, evaluate them and export "
                    "them in the released layout: one SAE (--layer, --position, --expansion) or a suite from one "
                    "LM pass (--hookpoints, or --layers / --positions / a list of --expansion). With no "
                    "arguments: SmolLM2-135M on CPython's docs, a few minutes on a CPU.",
        epilog="Details: docs/training.md (outputs, the real GPU job, resume and preemption), docs/suites.md "
               "(many SAEs from one LM pass), docs/parallelism.md (--tp, torchrun), docs/formats.md (what is "
               "loaded and never unpickled, the run-folder lock).",
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        base = f.metadata.get("cli_type") or _base_type(hint)
        text = f.metadata.get("help", "") + _default_text(f, flag, base)
        kw: Dict[str, Any] = {"help": text, "default": f.default, "dest": f.name}
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = base
            kw["metavar"] = {int: "N", float: "X", str: "S"}[base]
        p.add_argument(flag, **kw)
    return p


_RECIPE_AUTO = {"layer": "n_layers // 2", "eval_lm_tokens": "all of --eval-tokens"}


def _default_text(f, flag: str, base: type) -> str:
    """`` (default: ...)`` for the help of ``f``: both families for the settings that depend on the model
    (the embedded default and the Llama Scope recipe), the flag itself for booleans."""
    def show(v: Any) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    if f.name in EMBEDDED_DEFAULTS or f.name in RECIPE_DEFAULTS:
        emb = EMBEDDED_DEFAULTS.get(f.name)
        rec = RECIPE_DEFAULTS.get(f.name)
        emb_text = show(emb) if emb is not None else "as other models"
        rec_text = show(rec) if rec is not None else _RECIPE_AUTO[f.name]
        return f" (default: {emb_text} with the embedded model; {rec_text} for other models, the Llama Scope recipe)"
    if base is bool:
        on = f.default is True
        return f" (default: {flag if on else '--no-' + flag[2:]})" if f.default is not None else ""
    if f.default is not None:
        return " (default: %(default)s)"  # None defaults are explained in the text (auto per model)
    return ""


def _base_type(hint) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint
