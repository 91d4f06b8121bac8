"""Run folders and suites: find the SAEs a command was given, their hook points and run settings.

A *member* is one SAE folder in the released Llama Scope layout (``hyperparams.json``,
``lm_config.json``, ``checkpoints/final.safetensors``), as ``python -m trainer.run`` writes it, with
the run's ``train_config.json`` and ``eval.json`` beside it when it came from the trainer. A *suite*
is a folder of member folders (``<output>/L{layer}{position}-{expansion}x/``): every sub-folder
holding ``hyperparams.json`` is a member. A ``suite.json`` beside them is read only when present:
its ``members`` list (names, or objects with ``name`` and optionally ``folder`` / ``path``, as
``python -m trainer.run`` writes for a suite) must name existing member folders, and may add members
kept outside the suite folder. A suite folder that later runs wrote more members into is analysed
whole; name member folders one by one to analyse fewer.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from sae_kernels.sites import POSITIONS, Site

from ..data.lm import load_model, model_of_lm_config

WEIGHTS = "checkpoints/final.safetensors"


class RunError(ValueError):
    """A folder that is not a run or a suite, or runs that cannot be analysed together."""


@dataclass
class Member:
    """One SAE folder and what is known about the run that produced it."""

    folder: Path
    name: str  # e.g. "L12R-8x"
    layer: int
    position: str
    hyper: Dict[str, Any]
    train_config: Dict[str, Any] = field(default_factory=dict)
    eval: Dict[str, Any] = field(default_factory=dict)
    suite: Optional[Path] = None  # the suite folder, when the member was found through one

    def load_sae(self, device=None, dtype: str = "float32"):
        """The SAE as the method runs it at inference (``TopKSAE.from_llama_scope``, folded)."""
        from sae_kernels import TopKSAE

        return TopKSAE.from_llama_scope(self.folder, device=device, dtype=dtype)

    @property
    def model(self) -> Optional[str]:
        return self.train_config.get("model") or model_of_lm_config(_read_json(self.folder / "lm_config.json"))

    @property
    def key(self) -> str:
        """A name unique among the members of one command: the folder path as given."""
        return str(self.folder)


def parse_hook_point(hook_point_in: str) -> Optional[Tuple[int, str]]:
    """``blocks.15.hook_resid_post`` -> ``(15, "R")``; None for names of no known position."""
    site = Site.from_hooks(hook_point_in or None)
    return (site.layer, site.position) if site is not None else None


def _read_json(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RunError(f"{path}: not UTF-8 text (byte {e.start}): not a JSON file this trainer wrote") from None
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: not valid JSON ({e})") from None
    return obj if isinstance(obj, dict) else {}


def is_member(folder: Path) -> bool:
    return (folder / "hyperparams.json").is_file()


def load_member(folder: Path, suite: Optional[Path] = None) -> Member:
    folder = Path(folder)
    hyper = _read_json(folder / "hyperparams.json")
    if not (folder / WEIGHTS).is_file():
        raise RunError(f"{folder}: expected {WEIGHTS} beside hyperparams.json")
    # trainer runs write train_config.json in the member folder; a suite may keep one at its root
    cfg = _read_json(folder / "train_config.json") or (_read_json(suite / "train_config.json") if suite else {})
    where = parse_hook_point(str(hyper.get("hook_point_in", "")))
    if where is None and isinstance(hyper.get("layer"), int) and hyper.get("position") in POSITIONS:
        where = (int(hyper["layer"]), str(hyper["position"]))
    if where is None:
        raise RunError(
            f"{folder}/hyperparams.json: hook_point_in {hyper.get('hook_point_in')!r} names no known position "
            "(expected e.g. blocks.12.hook_resid_post, blocks.3.hook_attn_out, blocks.3.hook_mlp_out, "
            "blocks.3.ln2.hook_normalized)"
        )
    layer, position = where
    exp = hyper.get("expansion_factor")
    if not isinstance(exp, (int, float)):
        exp = int(hyper.get("d_sae", 0)) // max(int(hyper.get("d_model", 1)), 1)
    exp_s = str(int(exp)) if float(exp).is_integer() else f"{exp:g}"
    name = f"{Site(layer, position).name}-{exp_s}x"
    if folder.name.startswith(name + "-"):  # a suite member's own name: L12R-8x-k50, L12R-8x-batchtopk-k50
        name = folder.name
    return Member(folder=folder, name=name, layer=layer, position=position, hyper=hyper, train_config=cfg,
                  eval=_read_json(folder / "eval.json"), suite=suite)


def _listed_folder(folder: Path, entry: Any) -> Path:
    """The member folder a ``suite.json`` entry names: a name or ``path`` relative to the suite folder,
    else its ``folder`` (what the trainer wrote: relative to where it ran, so also tried by its last
    component under the suite folder, or absolute)."""
    if isinstance(entry, str):
        tries = [folder / entry]
    elif isinstance(entry, dict) and any(isinstance(entry.get(k), str) for k in ("name", "path", "folder")):
        tries = [folder / entry[k] for k in ("path", "name") if isinstance(entry.get(k), str)]
        f = entry.get("folder")
        if isinstance(f, str):
            tries += [folder / Path(f).name, Path(f)] if Path(f).is_absolute() else [folder / Path(f).name, folder / f]
    else:
        raise RunError(f"{folder}/suite.json: members: expected names or objects with 'name', 'folder' or 'path', "
                       f"got {entry!r}")
    for p in tries:
        if is_member(p):
            return p
    raise RunError(f"{folder}/suite.json lists {entry.get('name', entry) if isinstance(entry, dict) else entry!r}, "
                   f"but no member folder holding hyperparams.json was found (looked in "
                   f"{', '.join(str(p) for p in dict.fromkeys(tries))})")


def suite_members(folder: Path) -> List[Path]:
    """Member folders of a suite folder: every sub-folder that is one, and those ``suite.json`` lists
    (when present; each listed member must exist)."""
    found = [p for p in folder.iterdir() if p.is_dir() and is_member(p)]
    listed = _read_json(folder / "suite.json").get("members") if (folder / "suite.json").is_file() else None
    if listed is not None and not isinstance(listed, list):
        raise RunError(f"{folder}/suite.json: members: expected a list, got {type(listed).__name__}")
    seen = {p.resolve() for p in found}
    for entry in listed or []:
        p = _listed_folder(folder, entry)
        if p.resolve() not in seen:
            seen.add(p.resolve())
            found.append(p)
    return sorted(found, key=_member_order)


def _member_order(p: Path):
    """Suite order: layer, position, width, then a sweep's K numerically (k25 before k100)."""
    named = Site.parse_member(p.name)
    k = re.search(r"-k(\d+)$", p.name)
    return (0, *named[0].sort_key(), named[1], int(k.group(1)) if k else 0, p.name) if named else (1, 0, 0, 0, 0, p.name)


@dataclass
class RunSpec:
    """A folder the user named: one member, or a suite of them."""

    path: Path
    members: List[Member]
    is_suite: bool


def resolve_run(path: str | Path, arg: str = "RUN") -> RunSpec:
    """A run folder (one SAE) or a suite folder (a folder of them), checked; errors name ``arg``."""
    p = Path(path)
    if not p.is_dir():
        raise RunError(f"{arg} {str(path)!r}: no such folder")
    if is_member(p):
        return RunSpec(p, [load_member(p)], is_suite=False)
    members = suite_members(p)
    if not members:
        raise RunError(
            f"{arg} {str(path)!r}: expected a run folder (hyperparams.json + {WEIGHTS}, as python -m trainer.run "
            "writes it) or a suite folder holding such folders"
        )
    return RunSpec(p, [load_member(m, suite=p) for m in members], is_suite=True)


def settings_of(members: List[Member]) -> Dict[str, Any]:
    """The run settings the members share (model, data, context length, held-out rule), from the
    first member that has a train_config.json; {} when none has (a released checkpoint)."""
    for m in members:
        if m.train_config:
            return dict(m.train_config)
    return {}


def load_lm_for(members: List[Member], model: Optional[str], device: torch.device):
    settings = settings_of(members)
    name = model or settings.get("model") or members[0].model or "embedded"
    models = {m.model for m in members if m.model}
    if model is None and len({m.train_config.get("model") for m in members if m.train_config}) > 1:
        raise RunError(f"RUN: the SAEs were trained on different models ({sorted(models)}); one LM pass needs one "
                       "model: analyse them separately or pass --model")
    lm = load_model(name, device=device, dtype=torch.float32)
    for m in members:
        d = int(m.hyper.get("d_model", 0))
        if d != lm.d_model:
            raise RunError(f"{m.folder}: d_model {d} does not match the model's {lm.d_model} ({lm.name})")
        if m.layer >= lm.n_layers:
            raise RunError(f"{m.folder}: layer {m.layer}, but the model has {lm.n_layers} layers")
    return lm, settings
