"""``python -m trainer.run``'s flags: one per ``TrainConfig`` field, with its help and its default, listed by
group (``GROUPS``; each field names its group in its metadata), and ``--config FILE`` (JSON, YAML or TOML
with the same fields; the flags given override it).

Settings whose default depends on the model show both families: the embedded default's and the
Llama Scope recipe's (every other model).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..config import EMBEDDED_DEFAULTS, RECIPE_DEFAULTS, TrainConfig
from .common import Parser, suggest

PROG = "python -m trainer.run"

# The groups of flags --help lists, in its order, with the line it prints under each title.
GROUPS: Dict[str, str] = {
    "what to train": "The hook points and the SAE: one SAE (--layer, --position) or a suite from one LM pass "
                     "(--hookpoints, --layers, --positions, a list of --expansion).",
    "data": "The LM that produces the activations and the text it reads.",
    "recipe": "How long and how the SAE trains: tokens, optimiser, schedules, loss, precision.",
    "dead latents": "What keeps latents alive (docs/method.md sec. 13).",
    "parallelism": "Devices, and many GPUs under torchrun (docs/parallelism.md).",
    "outputs": "Where the run goes, checkpoints, logging, and the evaluation and exports after training.",
    "advanced": "The activation pipeline: LM batches, the buffer, the norm estimate, the activation cache; "
                "rarely changed.",
}
CONFIG_SUFFIXES = (".json", ".yaml", ".yml", ".toml")


class TrainParser(Parser):
    """Reads ``--config FILE`` before the flags: the file's settings become the defaults, so every flag given
    on the command line overrides them, wherever it stands. The namespace holds exactly TrainConfig's fields."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        pre = Parser(prog=self.prog, add_help=False)
        pre.add_argument("--config", action="append", default=[])
        files = pre.parse_known_args(args)[0].config
        if not files:
            return super().parse_known_args(args, namespace)
        if len(files) > 1:
            self.error(f"--config: expected one file, got {len(files)} ({', '.join(files)})")
        try:
            values = read_config_file(files[0])
        except ValueError as e:
            self.error(str(e))
        saved = {a.dest: a.default for a in self._actions}, dict(self._defaults)
        self.set_defaults(**values)
        try:
            return super().parse_known_args(args, namespace)
        finally:
            for a in self._actions:
                a.default = saved[0][a.dest]
            self._defaults = saved[1]


class _ReadFirst(argparse.Action):
    """``--config``: read by ``TrainParser.parse_known_args`` before the flags; stores nothing itself."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        pass


def build_parser() -> argparse.ArgumentParser:
    p = TrainParser(
        prog=PROG,
        usage="%(prog)s [--config FILE] [--FLAG VALUE ...]",
        description="Train Llama Scope TopK SAEs (or transcoders) on a causal LM, evaluate them and export "
                    "them in the released layout: one SAE (--layer, --position, --expansion) or a suite from one "
                    "LM pass (--hookpoints, or --layers / --positions / a list of --expansion). With no "
                    "arguments: SmolLM2-135M on CPython's docs, a few minutes on a CPU.",
        epilog="Details: docs/training.md (outputs, the real GPU job, resume and preemption, config files), "
               "docs/suites.md (many SAEs from one LM pass), docs/parallelism.md (--tp, torchrun), docs/formats.md "
               "(what is loaded and never unpickled, the run-folder lock).",
    )
    config = p.add_argument_group("config", "Settings from a file instead of flags.")
    config.add_argument(
        "--config", metavar="FILE", action=_ReadFirst, default=argparse.SUPPRESS,
        help="JSON, YAML (.yaml, .yml) or TOML file of settings named as the flags (layer, batch-size or "
             "batch_size, ...); flags given on the command line override it. A run's train_config.json is one.")
    groups = {title: p.add_argument_group(title, line) for title, line in GROUPS.items()}
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        base = f.metadata.get("cli_type") or _base_type(hints[f.name])
        text = f.metadata.get("help", "") + _default_text(f, flag, base)
        kw: Dict[str, Any] = {"help": argparse.SUPPRESS if f.metadata.get("hidden") else text,
                              "default": f.default, "dest": f.name}
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = base
            kw["metavar"] = {int: "N", float: "X", str: "S"}[base]
        group = f.metadata.get("group")
        if group not in groups:  # tests/unit/test_cli.py fails on such a field; the flag still works
            groups[group] = p.add_argument_group(str(group))
        groups[group].add_argument(flag, **kw)
    return p


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """The TrainConfig that ``python -m trainer.run ARGV`` trains (its flags and ``--config`` file)."""
    return TrainConfig(**vars(build_parser().parse_args(argv)))


# ----------------------------------------------------------------------------------- config files


def read_config_file(path: str) -> Dict[str, Any]:
    """The settings in a JSON, YAML or TOML file, by field name, each checked and converted as its flag
    would be; a ValueError naming the file (and the key) otherwise. Keys are the fields with underscores or
    dashes (``batch_size`` or ``batch-size``); a run's ``train_config.json`` reads as is."""
    where = f"--config {path}"
    file = Path(path).expanduser()
    suffix = file.suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise ValueError(f"{where}: expected a .json, .yaml, .yml or .toml file")
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file") from None
    except OSError as e:
        raise ValueError(f"{where}: cannot read it ({e.strerror or e})") from None
    data = _load(raw, suffix, where)
    if data is None:
        data = {}  # an empty YAML file
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of settings (key: value), got a {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    values: Dict[str, Any] = {}
    unknown: List[str] = []
    for key, value in data.items():
        if not isinstance(key, str):
            raise ValueError(f"{where}: key {key!r}: expected a setting's name")
        name = key.replace("-", "_")
        if name not in fields:
            unknown.append(key)
            continue
        if name in values:
            raise ValueError(f"{where}: {name!r} is given twice (as {name} and {name.replace('_', '-')})")
        values[name] = _convert(fields[name], hints[name], value, f"{where}: {key!r}")
    if unknown:
        listed = [n for n in fields if not fields[n].metadata.get("hidden")]
        parts = []
        for key in unknown:
            near = suggest(key.replace("-", "_"), listed)
            near = near.replace("_", "-") if near and "-" in key else near  # in the file's spelling
            parts.append(f"{key!r}" + (f"; did you mean {near!r}?" if near and len(unknown) == 1 else
                                       f" (did you mean {near!r}?)" if near else ""))
        raise ValueError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} " + ", ".join(parts))
    return values


def _load(raw: bytes, suffix: str, where: str) -> Any:
    if suffix == ".json":
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
    if suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(raw.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{where}: not valid TOML ({e})") from None
    import yaml

    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: not valid YAML ({' '.join(str(e).split())})") from None


def _convert(f: dataclasses.Field, hint: Any, value: Any, where: str) -> Any:
    """A file's value for field ``f`` as its flag would give it: numbers written as text (YAML reads 8e-4 as
    text) are converted like the flag's argument; booleans must be true or false."""
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise ValueError(f"{where}: expected a value, got null")
    if f.metadata.get("cli_type") is str:  # --expansion: 8, "8,32" or [8, 32]; TrainConfig checks the items
        return value
    base = _base_type(hint)
    if base is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected {'a number' if base is not str else 'text'}, got {value!r}")
    if base is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, (int, str)):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if base is float:
        if isinstance(value, (int, float, str)):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):  # YAML reads 'layers: 3' as a number
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected text, got {value!r}")
    return value


# ----------------------------------------------------------------------------------- help texts

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
