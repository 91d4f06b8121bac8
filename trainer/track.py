"""Experiment trackers, off by default: ``--wandb`` and ``--tensorboard`` mirror each member's
``metrics.jsonl`` lines (the source of truth) into one tracker run per suite, keys ``<member>/<metric>``.
Neither package is imported unless its flag is used.

- the x axis is the training step; ``<member>/tokens`` is logged beside the metrics;
- the run's configuration (``cfg.to_dict()``) is the tracker's config (TensorBoard: its hparams);
- at the end, each member's held-out metrics (its ``eval.json``) go in as ``<member>/eval/<metric>``:
  the W&B run summary, TensorBoard hparam metrics and a text table;
- a ``--resume`` opens a new tracker run (same name) that first replays the lines its members'
  ``metrics.jsonl`` kept up to the checkpoint, so the new run holds the whole training curve.

``check_trackers(cfg)`` only checks that the packages import (before the model loads); ``open_trackers``
starts the runs (global rank 0, once the run folders exist).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import run_folder as names

# flag -> (the module the tracker imports, the package to install)
PACKAGES = {"wandb": ("wandb", "wandb"), "tensorboard": ("torch.utils.tensorboard", "tensorboard")}


def _import(flag: str):
    """The tracker's module, or a one-line ``ValueError`` naming the flag and the package to install."""
    import importlib

    module, package = PACKAGES[flag]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = getattr(e, "name", None)
        if missing is None or missing == module or missing.split(".")[0] == package:
            raise ValueError(f"--{flag}: needs the {package} package (pip install {package})") from None
        raise ValueError(f"--{flag}: the {package} package did not import ({type(e).__name__}: {e})") from None


def check_trackers(cfg) -> None:
    """The tracker packages the flags ask for import (nothing is started): called before the model loads,
    so a missing package is one line at once rather than after the model and data are loaded."""
    for flag in PACKAGES:
        if getattr(cfg, flag, False):
            _import(flag)


def _numbers(d: Dict[str, Any], prefix: str = "") -> Dict[str, float]:
    """The numeric (finite or not) entries of ``d``, nested dicts flattened with ``/``; bools as 0 / 1."""
    out: Dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, bool):
            out[prefix + k] = int(v)
        elif isinstance(v, (int, float)):
            out[prefix + k] = v
    return out


def eval_metrics(results: Dict[str, Dict[str, Any]]) -> Dict[str, float]:
    """``<member>/eval/<metric>`` for each member's numeric ``eval.json`` entries (explained variance,
    L0, delta LM loss, CE score, dead latents, ...), its JumpReLU export's (``.../eval/jumprelu/<metric>``)
    and its phase times (``.../eval/seconds/<phase>``). The last training line is in the history already."""
    out: Dict[str, float] = {}
    for name, r in results.items():
        out.update(_numbers(r, f"{name}/eval/"))
        for sub in ("jumprelu", "seconds"):
            if isinstance(r.get(sub), dict):
                out.update(_numbers(r[sub], f"{name}/eval/{sub}/"))
    return out


def history_scalars(records: Dict[str, Dict[str, Any]]) -> Dict[str, float]:
    """One metrics line per member as ``<member>/<metric>`` (``step`` is the x axis, not a key)."""
    return {f"{name}/{k}": v for name, rec in records.items() for k, v in _numbers(rec).items() if k != "step"}


class WandbTracker:
    """One W&B run per suite: ``wandb.init(project, name=<output folder>, dir=<output>, config=cfg)``.
    ``WANDB_MODE=offline`` logs to ``<output>/wandb/offline-run-*`` without a network (``wandb sync`` later);
    nothing here logs in."""

    name = "wandb"

    def __init__(self, cfg, out: Path, log: Callable[[str], None]) -> None:
        wandb = _import("wandb")
        run_name = Path(out).resolve().name
        try:
            self.run = wandb.init(project=cfg.wandb_project, name=run_name, dir=str(out), config=cfg.to_dict(),
                                  reinit=_reinit(wandb))
        except Exception as e:  # not logged in, no network, a bad setting: one line, before any training
            raise ValueError(f"--wandb: could not start a run ({type(e).__name__}: {e}); log in with `wandb login`, "
                             "or set WANDB_MODE=offline to log without a network") from None
        where = getattr(self.run, "url", None) or getattr(self.run, "dir", None) or out
        log(f"--wandb: run {run_name!r} in project {cfg.wandb_project!r}: {where}")

    def log(self, step: int, records: Dict[str, Dict[str, Any]]) -> None:
        self.run.log(history_scalars(records), step=step)

    def summary(self, results: Dict[str, Dict[str, Any]]) -> None:
        self.run.summary.update(eval_metrics(results))

    def close(self, failed: bool = False) -> None:
        run, self.run = self.run, None
        if run is not None:
            run.finish(exit_code=1 if failed else 0)


def _reinit(wandb) -> Any:
    """Our run never finishes nor returns a run the user's process started (wandb >= 0.19.10); a bool before."""
    try:
        v = tuple(int(p) for p in wandb.__version__.split(".")[:3])
    except (AttributeError, ValueError):
        return "create_new"
    return "create_new" if v >= (0, 19, 10) else True


class TensorBoardTracker:
    """``torch.utils.tensorboard.SummaryWriter(<output>/tensorboard)``: one scalar per key and step; at the
    end the config as hparams with the members' held-out metrics, and a text table of them."""

    name = "tensorboard"

    def __init__(self, cfg, out: Path, log: Callable[[str], None]) -> None:
        tb = _import("tensorboard")
        self.log_dir = Path(out) / "tensorboard"
        self.writer = tb.SummaryWriter(log_dir=str(self.log_dir))
        self.hparams = {k: (v if isinstance(v, (bool, int, float, str)) else json.dumps(v))
                        for k, v in cfg.to_dict().items() if v is not None}
        self.writer.add_text("config", "```\n" + json.dumps(cfg.to_dict(), indent=2) + "\n```", 0)
        log(f"--tensorboard: event files in {self.log_dir} (tensorboard --logdir {self.log_dir})")

    def log(self, step: int, records: Dict[str, Dict[str, Any]]) -> None:
        for key, v in history_scalars(records).items():
            self.writer.add_scalar(key, v, global_step=step)

    def summary(self, results: Dict[str, Dict[str, Any]]) -> None:
        metrics = eval_metrics(results)
        # run_name ".": the hparams join this run's folder (one run in TensorBoard), not a timestamped one
        self.writer.add_hparams(self.hparams, metrics, run_name=".")
        self.writer.add_text("eval", eval_table(results), 0)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()


def eval_table(results: Dict[str, Dict[str, Any]]) -> str:
    """The members' headline held-out metrics as a Markdown table (TensorBoard's text tab)."""
    cols = ("explained_variance", "l0", "delta_lm_loss", "ce_score", "dead_latents_eval", "d_sae")
    lines = ["| member | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join("n/a" if r.get(c) is None else f"{r[c]:.6g}" for c in cols) + " |")
    return "\n".join(lines)


def replay_history(member_dirs: Dict[str, Path], before_step: int) -> List[tuple]:
    """``[(step, {member: record})]`` of the members' ``metrics.jsonl`` lines before ``before_step``, in
    step order (a resumed run's new tracker run starts with the curve its checkpoint kept)."""
    steps: Dict[int, Dict[str, Dict[str, Any]]] = {}
    for name, folder in member_dirs.items():
        try:
            text = (Path(folder) / names.METRICS).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line a kill cut short
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] < before_step:
                steps.setdefault(rec["step"], {})[name] = rec
    return sorted(steps.items())


class Trackers:
    """The trackers of a run (none by default): ``log`` at each metrics line, ``summary`` with each member's
    ``eval.json``, ``close`` at the end (also after a failure). ``metrics.jsonl`` is the source of truth: a
    tracker that fails while logging is reported in one line and dropped, the training goes on."""

    def __init__(self, trackers: Sequence[Any] = (), log: Callable[[str], None] = print,
                 replay: Optional[Dict[str, Path]] = None) -> None:
        self.trackers = list(trackers)
        self._log = log
        self._replay = replay  # member folders whose earlier lines the first ``log`` replays (--resume)

    def _each(self, what: str, *args) -> None:
        for t in list(self.trackers):
            try:
                getattr(t, what)(*args)
            except Exception as e:  # noqa: BLE001 -- a tracker never ends a run
                self._log(f"--{getattr(t, 'name', type(t).__name__)}: {what} failed ({type(e).__name__}: {e}); "
                          f"the tracker is off from here, metrics.jsonl has every line")
                self.trackers.remove(t)
                try:
                    t.close(failed=True)
                except Exception:  # noqa: BLE001
                    pass

    def log(self, step: int, records: Dict[str, Dict[str, Any]]) -> None:
        if not self.trackers:
            return
        if self._replay is not None:
            replay, self._replay = self._replay, None
            for s, recs in replay_history(replay, step):
                self._each("log", s, recs)
        self._each("log", step, records)

    def summary(self, results: Dict[str, Dict[str, Any]]) -> None:
        self._each("summary", results)

    def close(self) -> None:
        """Finish every tracker run (idempotent); a run left by an exception is marked failed."""
        failed = sys.exc_info()[0] is not None
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            t.close(failed=failed)


TRACKERS = {"wandb": WandbTracker, "tensorboard": TensorBoardTracker}


def open_trackers(cfg, out: Path, names: List[str], log: Callable[[str], None] = print) -> Trackers:
    """The trackers ``cfg`` asks for (global rank 0 only); an empty ``Trackers`` when none is."""
    wanted = [flag for flag in TRACKERS if getattr(cfg, flag, False)]
    if not wanted:
        return Trackers([], log)
    check_trackers(cfg)
    opened: List[Any] = []
    try:
        for flag in wanted:
            opened.append(TRACKERS[flag](cfg, Path(out), log))
    except BaseException:
        for t in opened:
            t.close(failed=True)
        raise
    replay = {n: Path(out) / n for n in names} if getattr(cfg, "resume", False) else None
    return Trackers(opened, log, replay)
