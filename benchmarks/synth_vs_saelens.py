"""Our SAE architectures against SAELens's on SAELens's own SynthSAEBench data (known ground-truth features).

    python benchmarks/synth_vs_saelens.py --quick            # tiny world, one seed, one lr: seconds on a CPU
    python benchmarks/synth_vs_saelens.py                    # 4096 features, d_in 256, 1M samples: a GPU job
    python benchmarks/synth_vs_saelens.py --methods ours-topk,saelens-topk --lrs ours=2e-3,saelens=3e-4

What it does:

* The world is a ``sae_lens.synthetic.SyntheticModel`` shaped like SynthSAEBench-16k at a smaller scale:
  Zipfian firing probabilities (exponent 0.5, the 16k world's curve truncated to the first N features),
  a hierarchy of mutually exclusive children (branching 4, depth 3; roots scaled with N), low-rank
  correlations (rank 25, scale 0.1), orthogonalised feature vectors, mean magnitudes 5 -> 4, folded-normal
  magnitude noise (mean 0.5, std 0.5). One world per invocation (``--world-seed``); ``--seeds`` vary the
  SAE initialisation and the training stream.
* Every run of a seed trains on exactly the same batches, ours and SAELens's alike (``Stream``: sampled in
  chunks under seeds derived from the run's seed, kept in memory while that seed's runs train), and every
  SAE is scored on the same evaluation samples.
* Ours (``ours-<architecture>``): ``trainer.train.SAEStep`` with the trainer's default recipe, resolved by
  ``trainer.config.TrainConfig`` exactly as ``python -m trainer.run`` resolves it for a non-embedded model
  (``train_ours``); ``ours-released`` is TopK with Llama Scope's released recipe (no AuxK, plain Adam rows).
  The trained SAE is taken as it runs at inference (``SAEStep.full_sae``: BatchTopK and Matryoshka as
  JumpReLU at the EMA threshold), written with ``TopKSAE.to_saelens`` and loaded by
  ``sae_lens.SAE.load_from_disk``.
* SAELens (``saelens-<architecture>``): its ``SAETrainer`` with the trainer configuration of its synthetic
  runner (``SyntheticSAERunnerConfig(...).to_sae_trainer_config()``: SAELens's defaults) fed the same batches;
  the trained SAE is exported as SAELens exports it (``save_inference_model``: BatchTopK and Matryoshka as
  JumpReLU) and loaded by ``SAE.load_from_disk``. Width, K (JumpReLU: ``target_l0`` of its quadratic L0
  loss), samples and batch size match ours; its dead-latent window is set to ours.
* Both are scored by SAELens's ``sae_lens.synthetic.eval_sae_on_synthetic_data``: MCC (Hungarian-matched
  mean |cosine| between decoder rows and true features), mean F1 / precision / recall of each latent as a
  detector of its best-matching feature, explained variance, L0, latents dead on the evaluation samples.

Writes a JSON (settings, versions, device, per-run metrics, the best lr of each method by mean MCC over
seeds) and a Markdown table next to it (same name, ``.md``), both rewritten after every run.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

# Before torch loads libgomp (as trainer/__init__.py does): spinning OpenMP waits make the small ops of a CPU
# step 10-100x slower when another process or thread competes for the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OURS = ("ours-topk", "ours-batchtopk", "ours-matryoshka_batchtopk", "ours-released")
THEIRS = ("saelens-topk", "saelens-batchtopk", "saelens-matryoshka_batchtopk", "saelens-jumprelu")
METHODS = OURS + THEIRS
FAMILIES = ("ours", "saelens")

# The two settings. "full" is the scaled-down world of earlier comparisons; "quick" runs in seconds on a CPU.
SETTINGS: Dict[str, Dict[str, Any]] = {
    "full": dict(features=4096, d_in=256, d_sae=1024, k=12, samples=1_000_000, batch_size=1024, seeds=[42, 43],
                 hierarchy_roots=32, ortho_steps=100, eval_samples=100_000,
                 lrs={"ours": [5e-4, 1e-3, 2e-3, 4e-3], "saelens": [1e-4, 3e-4, 1e-3, 3e-3]}),
    "quick": dict(features=256, d_in=64, d_sae=128, k=4, samples=20_480, batch_size=1024, seeds=[42],
                  hierarchy_roots=2, ortho_steps=100, eval_samples=4096,
                  lrs={"ours": [2e-3], "saelens": [3e-4]}),
}
# SynthSAEBench-16k's firing-probability curve (SAELens docs: Zipfian, exponent 0.5, p_max 0.4, p_min 5e-4
# over 16,384 features). A Zipfian curve is affine in rank^-exponent, so the first N features of the 16k
# curve are exactly a Zipfian curve over N features from p_max down to the 16k curve's value at rank N.
ZIPF_16K = dict(exponent=0.5, max_prob=0.4, min_prob=5e-4, num_features=16384)
EVAL_SEED = 987_654_321  # every SAE is scored on the same samples


# ----------------------------------------------------------------------------------------------- the world

def zipf_min_prob(n: int, c: Dict[str, float] = ZIPF_16K) -> float:
    """The 16k world's firing probability at rank ``n``: the ``min_prob`` of its curve truncated to ``n``."""
    N, a = c["num_features"], c["exponent"]
    lo = N ** -a
    return c["min_prob"] + (c["max_prob"] - c["min_prob"]) * (n ** -a - lo) / (1 - lo)


def make_world(features: int, d_in: int, roots: int, seed: int, device: str, ortho_steps: int = 100):
    """A ``SyntheticModel`` shaped like SynthSAEBench-16k (see the module docstring); ``ortho_steps`` 0: the
    feature vectors are not orthogonalised (random unit vectors)."""
    from sae_lens.synthetic import (
        FoldedNormalMagnitudeConfig, HierarchyConfig, LinearMagnitudeConfig, LowRankCorrelationConfig,
        OrthogonalizationConfig, SyntheticModel, SyntheticModelConfig, ZipfianFiringProbabilityConfig,
    )

    cfg = SyntheticModelConfig(
        num_features=features, hidden_dim=d_in,
        firing_probability=ZipfianFiringProbabilityConfig(
            exponent=ZIPF_16K["exponent"], max_prob=ZIPF_16K["max_prob"], min_prob=zipf_min_prob(features)),
        hierarchy=HierarchyConfig(total_root_nodes=roots, branching_factor=4, max_depth=3,
                                  mutually_exclusive_portion=1.0) if roots > 0 else None,
        orthogonalization=OrthogonalizationConfig(num_steps=ortho_steps, lr=3e-4) if ortho_steps > 0 else None,
        correlation=LowRankCorrelationConfig(rank=25, correlation_scale=0.1),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        seed=seed,
    )
    return SyntheticModel(cfg, device=device)


@contextlib.contextmanager
def _quiet(verbose: bool):
    """Hide what is written to stderr (SAELens's progress bars) unless ``verbose``; on an error, show it."""
    if verbose:
        yield
        return
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            yield
    except BaseException:
        sys.stderr.write(buf.getvalue())
        raise


def _rng_devices(device) -> list:
    import torch

    dev = torch.device(device)
    return [dev] if dev.type == "cuda" else []


class Stream:
    """The training stream of one seed, the same for every method: sampled in chunks of ``chunk_samples``
    (``feature_dict(activation_generator.sample(chunk_samples))``: SAELens's sampler costs about as much
    per call as per 20k samples on a CPU), chunk ``j`` under RNG seed ``seed * 1_000_003 + j + 1`` with the
    global RNG left as it was, and cut into batches of ``batch_size``. Chunks are kept in memory (on the
    world's device) when the stream's ``n_batches`` fit in ``keep_bytes``, so the runs of a seed after the
    first do not sample again; batches beyond ``n_batches`` (an endless provider) are sampled on demand."""

    def __init__(self, world, batch_size: int, seed: int, n_batches: int, chunk_samples: int,
                 keep_bytes: int = 2 << 30) -> None:
        if chunk_samples % batch_size:
            raise ValueError(f"chunk_samples: expected a multiple of batch_size {batch_size}, got {chunk_samples}")
        self.world, self.batch_size, self.seed, self.n_batches = world, batch_size, seed, n_batches
        self.chunk_samples = chunk_samples
        self.devices = _rng_devices(world.device)
        self.keep = n_batches * batch_size * world.cfg.hidden_dim * 4 <= keep_bytes
        self._chunks: Dict[int, Any] = {}
        self.sample_seconds = 0.0

    def chunk(self, j: int):
        import torch

        if j in self._chunks:
            return self._chunks[j]
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=self.devices), torch.no_grad():
            torch.manual_seed(self.seed * 1_000_003 + j + 1)
            x = self.world.feature_dict(self.world.activation_generator.sample(self.chunk_samples))
        self.sample_seconds += time.perf_counter() - t0
        if self.keep and j * self.chunk_samples < self.n_batches * self.batch_size:
            self._chunks[j] = x
        return x

    def batches(self, endless: bool = False) -> Iterator:
        """Batches ``0, 1, ...`` (copies: the kept chunks are never handed out), ``n_batches`` of them or
        ``endless`` (SAELens's ``DataProvider``)."""
        per = self.chunk_samples // self.batch_size
        i = 0
        while endless or i < self.n_batches:
            x = self.chunk(i // per)
            r = (i % per) * self.batch_size
            yield x[r: r + self.batch_size].clone()
            i += 1


# ----------------------------------------------------------------------------------------------- ours

def our_recipe(d: int, d_sae: int, k: int, architecture: str, lr: float, total_steps: int, batch_size: int,
               seed: int, released: bool = False, device_type: str = "cpu"):
    """``(resolved TrainConfig of the member, StepConfig)``: the trainer's default recipe (or the released
    one) for an SAE of ``d_sae`` latents on ``d``-wide activations, as ``python -m trainer.run`` resolves it
    for a model other than the embedded default (``TrainConfig.resolve``, ``solo``,
    ``StepConfig.from_train_config``): K-annealing from max(K, d/2) over 10% of the steps, warmup
    min(5000, 5% of the steps), linear decay over the last 20%, clip 0.001, Llama Scope loss, Adam betas
    (0.9, 0.9999); by default AuxK (coefficient 1/4, k_aux d/2) and the hold-dead / reset-dead-moments Adam
    row flags, a latent dead after min(10M, max(16 batches, tokens / 20)) tokens without firing."""
    from trainer.config import TrainConfig
    from trainer.train import StepConfig

    if d_sae % d:
        raise ValueError(f"d_sae: expected a multiple of d_in = {d} (the trainer's width is an expansion factor), "
                         f"got {d_sae}")
    c = TrainConfig(model="synthsaebench", layer=0, tokens=total_steps * batch_size, batch_size=batch_size,
                    buffer_tokens=2 * batch_size, lr=lr, k=k, expansion=d_sae // d, architecture=architecture,
                    released_recipe=released, seed=seed, progress=False)
    c = c.resolve(n_layers=1, d_model=d, device_type=device_type)
    (member,) = c.members()
    solo = c.solo(member, d)
    return solo, StepConfig.from_train_config(solo)


def train_ours(batches: Iterable, d: int, d_sae: int, k: int, architecture: str, lr: float, total_steps: int,
               seed: int, released: bool = False):
    """Train one of our SAEs on ``batches`` (an iterable of raw ``[B, d]`` activations, at least
    ``total_steps`` of them) with the trainer's default recipe (``our_recipe``; ``released=True``: Llama
    Scope's released recipe, no AuxK and plain Adam rows). As the trainer does: the initialisation is
    seeded by ``seed``, the dataset norm ``sqrt(d) / mean_t ||x_t||`` comes from the first ``norm_tokens``
    (16384) rows of the stream, which are then trained on too. In fp32 on any device (SAELens's runs are
    fp32 too; the trainer's default on a GPU would be bf16 compute). Returns ``(SAE as it runs at inference
    (SAEStep.full_sae, on CPU), info)``; ``info`` holds the recipe, the last step's training metrics, the
    latents dead at the end of training and BatchTopK's inference threshold."""
    import torch

    from sae_kernels import SAEConfig, TopKSAE
    from trainer.train import SAEStep, make_optimizer
    from trainer.train.step import estimate_norm

    it = iter(batches)
    first = next(it, None)
    if first is None:
        raise ValueError(f"batches: expected at least total_steps = {total_steps} batches, got none")
    B, device = first.shape[0], first.device
    solo, step_cfg = our_recipe(d, d_sae, k, architecture, lr, total_steps, B, seed, released, device.type)
    head = [first]
    while len(head) * B < solo.norm_tokens and len(head) < total_steps:
        x = next(it, None)
        if x is None:
            break
        head.append(x)
    mu = estimate_norm(torch.cat(head))
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)
        sae = TopKSAE(SAEConfig(d_model=d, d_sae=d_sae, k=k, weighted_topk=not solo.plain_topk, dtype="float32"),
                      device=device)
    norm = math.sqrt(d) / mu
    sae.cfg = sae.cfg.replace(norm_in=norm, norm_out=norm)
    step = SAEStep(sae, make_optimizer(sae, solo.lr, (solo.beta1, solo.beta2)), step_cfg)
    out: Dict[str, Any] = {}
    n = 0
    for t, x in enumerate(itertools.chain(head, it)):
        if t >= total_steps:
            break
        out = step(x, None, t)
        n += 1
    if n < total_steps:
        raise ValueError(f"batches: expected at least total_steps = {total_steps} batches, got {n}")
    last = {key: float(v) for key, v in out.items()}
    recipe = {f: getattr(step_cfg, f) for f in (
        "k", "k_start", "total_steps", "anneal_steps", "warmup_steps", "decay_fraction", "lr", "clip_grad_norm",
        "loss", "auxk", "auxk_coef", "k_aux", "dead_window_tokens", "hold_dead", "reset_dead_moments", "data_init",
        "architecture", "matryoshka_widths", "threshold_decay")}
    recipe.update(betas=[solo.beta1, solo.beta2], weighted_topk=not solo.plain_topk, norm_tokens=len(head) * B,
                  dataset_norm=mu, released_recipe=released, compute_dtype="float32")
    if isinstance(recipe["matryoshka_widths"], tuple):
        recipe["matryoshka_widths"] = list(recipe["matryoshka_widths"])
    dead = int((step.since_fired >= step_cfg.dead_window_tokens).sum())
    info = {"recipe": recipe, "train_last_step": last, "dead_in_training": dead, "threshold": step.threshold()}
    return step.full_sae(), info


# ----------------------------------------------------------------------------------------------- SAELens's

def saelens_sae_config(architecture: str, d: int, d_sae: int, k: int, matryoshka_widths: Sequence[int], device: str):
    """SAELens's training config of ``architecture`` at our width and K, its defaults otherwise (TopK family:
    decoder-norm-rescaled selection, AuxK coefficient 1, decoder init norm 0.1, b_dec subtracted from the
    input; JumpReLU: Gemma Scope 2's quadratic L0 loss around ``target_l0 = K``)."""
    from sae_lens import (
        BatchTopKTrainingSAEConfig, JumpReLUTrainingSAEConfig, MatryoshkaBatchTopKTrainingSAEConfig,
        TopKTrainingSAEConfig,
    )

    common = dict(d_in=d, d_sae=d_sae, dtype="float32", device=device)
    if architecture == "topk":
        return TopKTrainingSAEConfig(k=k, **common)
    if architecture == "batchtopk":
        return BatchTopKTrainingSAEConfig(k=float(k), **common)
    if architecture == "matryoshka_batchtopk":
        return MatryoshkaBatchTopKTrainingSAEConfig(k=float(k), matryoshka_widths=list(matryoshka_widths), **common)
    if architecture == "jumprelu":
        return JumpReLUTrainingSAEConfig(jumprelu_sparsity_loss_mode="quadratic", target_l0=float(k), **common)
    raise ValueError(f"architecture: expected one of topk, batchtopk, matryoshka_batchtopk, jumprelu, got {architecture!r}")


def saelens_dead_window_steps(dead_window_tokens: int, batch_size: int) -> int:
    """SAELens's ``dead_feature_window`` (steps) that marks a latent dead at the same step as ours: ours is dead
    after ``ceil(window / B)`` steps without firing, SAELens's when its step count exceeds its window."""
    return max(0, math.ceil(dead_window_tokens / batch_size) - 1)


def train_saelens(batches: Iterator, world, architecture: str, d: int, d_sae: int, k: int, lr: float, samples: int,
                  batch_size: int, seed: int, dead_feature_window: int, matryoshka_widths: Sequence[int],
                  device: str, out_dir: Path, verbose: bool = False):
    """Train SAELens's ``architecture`` with its own trainer and return ``(inference SAE, info)``: the
    ``SAETrainer`` that ``SyntheticSAERunner`` builds (its ``to_sae_trainer_config``, its defaults: Adam
    (0.9, 0.999), constant lr, no warmup, grad-norm clip 1) with our batches as the data provider, then the
    SAE as SAELens exports it (``save_inference_model``) loaded by ``SAE.load_from_disk``."""
    import torch
    from sae_lens import SAE, LoggingConfig
    from sae_lens.registry import get_sae_training_class
    from sae_lens.synthetic import SyntheticSAERunnerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae_cfg = saelens_sae_config(architecture, d, d_sae, k, matryoshka_widths, device)
    runner_cfg = SyntheticSAERunnerConfig(
        synthetic_model=world.cfg, sae=sae_cfg, training_samples=samples, batch_size=batch_size, lr=lr,
        device=device, dead_feature_window=dead_feature_window, checkpoint_path=None, output_path=None,
        eval_frequency=0, run_final_eval=False, logger=LoggingConfig(log_to_wandb=False))
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)
        sae_cls, _ = get_sae_training_class(architecture)
        sae = sae_cls(sae_cfg)
    trainer_cfg = runner_cfg.to_sae_trainer_config()
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches)
    with _quiet(verbose):  # its progress bar
        trained = trainer.fit()
    dead_in_training = int(trainer.dead_neurons.sum())
    trained.save_inference_model(str(out_dir))
    inference = SAE.load_from_disk(str(out_dir), device=device)
    recipe = {f: getattr(trainer_cfg, f) for f in (
        "lr", "lr_scheduler_name", "lr_warm_up_steps", "lr_decay_steps", "adam_beta1", "adam_beta2",
        "dead_feature_window", "train_batch_size_samples", "total_training_samples")}
    recipe["sae"] = {f: getattr(sae_cfg, f) for f in (
        "k", "rescale_acts_by_decoder_norm", "aux_loss_coefficient", "decoder_init_norm", "apply_b_dec_to_input",
        "normalize_activations", "topk_threshold_lr", "matryoshka_widths", "use_matryoshka_aux_loss",
        "jumprelu_sparsity_loss_mode", "target_l0", "l0_coefficient", "jumprelu_init_threshold",
        "jumprelu_bandwidth") if hasattr(sae_cfg, f)}
    recipe["grad_clip_norm"] = 1.0  # hard-coded in SAETrainer._train_step
    info = {"recipe": recipe, "dead_in_training": dead_in_training, "architecture_saved": inference.cfg.architecture()}
    return inference, info


# ----------------------------------------------------------------------------------------------- scoring

def evaluate(sae, world, eval_samples: int, device: str) -> Dict[str, float]:
    """SAELens's ``eval_sae_on_synthetic_data`` on the same ``eval_samples`` samples for every SAE."""
    import torch
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(EVAL_SEED)
        r = eval_sae_on_synthetic_data(sae, world.feature_dict, world.activation_generator,
                                       num_samples=eval_samples, batch_size=min(eval_samples, 16384))
    c = r.classification
    return {"mcc": r.mcc, "f1": c.f1_score, "precision": c.precision, "recall": c.recall, "accuracy": c.accuracy,
            "explained_variance": r.explained_variance, "l0": r.sae_l0, "dead_latents": int(r.dead_latents),
            "shrinkage": r.shrinkage, "uniqueness": r.uniqueness, "true_l0": r.true_l0}


def run_one(method: str, lr: float, seed: int, world, stream: Stream, s: Dict[str, Any], device: str,
            tmp: Path) -> Dict[str, Any]:
    """Train ``method`` at ``lr`` on the seed's ``stream`` and score it; the run's JSON entry."""
    import torch
    from sae_lens import SAE

    family, arch = method.split("-", 1)
    released = method == "ours-released"
    arch = "topk" if released else arch
    steps = s["steps"]
    sampled = stream.sample_seconds
    t0 = time.perf_counter()
    path = tmp / f"{method}-{_lr(lr)}-{seed}"
    if family == "ours":
        ours, info = train_ours(stream.batches(), s["d_in"], s["d_sae"], s["k"], arch, lr, steps, seed,
                                released=released)
        _sync(device)
        t1 = time.perf_counter()
        ours.to_saelens(path)
        sae = SAE.load_from_disk(str(path), device=device)
        info["architecture_saved"] = sae.cfg.architecture()
    else:
        sae, info = train_saelens(stream.batches(endless=True), world, arch, s["d_in"], s["d_sae"], s["k"], lr,
                                  s["samples"], s["batch_size"], seed, s["saelens_dead_feature_window"],
                                  s["matryoshka_widths"], device, path, verbose=s["verbose"])
        _sync(device)
        t1 = time.perf_counter()
    sampled = stream.sample_seconds - sampled
    metrics = evaluate(sae, world, s["eval_samples"], device)
    _sync(device)
    t2 = time.perf_counter()
    del sae
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"method": method, "family": family, "architecture": arch, "lr": lr, "seed": seed, "metrics": metrics,
            "train_seconds": round(t1 - t0 - sampled, 3), "sample_seconds": round(sampled, 3),
            "eval_seconds": round(t2 - t1, 3), **info}


def _run_order(r: Dict[str, Any]) -> Tuple[int, float, int]:
    """Runs listed by method (in METHODS order), lr, seed."""
    return METHODS.index(r["method"]), r["lr"], r["seed"]


def _sync(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def best_by_method(runs: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per method, the lr with the highest mean MCC over its seeds, with the mean (and min, max) metrics."""
    groups: Dict[Tuple[str, float], List[Dict[str, Any]]] = {}
    for r in runs:
        if "metrics" in r:
            groups.setdefault((r["method"], r["lr"]), []).append(r)
    best: Dict[str, Dict[str, Any]] = {}
    for (method, lr), rs in groups.items():
        ms = [r["metrics"] for r in rs]
        mean = {key: sum(m[key] for m in ms) / len(ms) for key in ms[0]}
        entry = {"lr": lr, "seeds": [r["seed"] for r in rs], "mean": mean,
                 "min": {key: min(m[key] for m in ms) for key in ms[0]},
                 "max": {key: max(m[key] for m in ms) for key in ms[0]}}
        if method not in best or mean["mcc"] > best[method]["mean"]["mcc"]:
            best[method] = entry
    return {m: best[m] for m in METHODS if m in best}


# ----------------------------------------------------------------------------------------------- reporting

def _git(*args: str) -> Optional[str]:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return None


def versions() -> Dict[str, Any]:
    import sae_lens
    import torch

    try:
        from importlib.metadata import version

        ours = version("sae-kernels")
    except Exception:
        ours = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"python": platform.python_version(), "torch": torch.__version__, "sae_lens": sae_lens.__version__,
            "sae_kernels": ours, "git_commit": _git("rev-parse", "HEAD"),
            "git_dirty": None if status is None else bool(status)}


def device_info(device: str) -> Dict[str, Any]:
    import torch

    dev = torch.device(device)
    out: Dict[str, Any] = {"device": str(dev), "type": dev.type, "torch_threads": torch.get_num_threads(),
                           "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if dev.type == "cuda":
        out["name"] = torch.cuda.get_device_name(dev)
    else:
        out["name"] = platform.processor() or platform.machine()
    return out


def _lr(x: float) -> str:
    """A learning rate as 5e-4, 1e-3, 2.5e-3."""
    m, e = f"{x:.6e}".split("e")
    return f"{m.rstrip('0').rstrip('.')}e{int(e)}"


def _fmt(v: Any, nd: int = 3) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{nd}f}"
    return str(v)


def markdown(doc: Dict[str, Any]) -> str:
    s, v, d = doc["settings"], doc["versions"], doc["device"]
    lines = [
        f"# Our SAEs against SAELens's on SynthSAEBench data ({s['mode']})",
        "",
        f"World: {s['features']} true features, d_in {s['d_in']}, true L0 {_fmt(doc['world'].get('true_l0'), 2)} "
        f"(world seed {s['world_seed']}). SAEs: {s['d_sae']} latents, K {s['k']}, {s['samples']:,} samples, batch "
        f"{s['batch_size']} ({s['steps']} steps), seeds {', '.join(map(str, s['seeds']))}. Scored by SAELens's "
        f"eval_sae_on_synthetic_data on {s['eval_samples']:,} samples (the same for every SAE); dead = latents that "
        f"never fire on them.",
        f"Device: {d['name']} ({d['type']}); torch {v['torch']}, sae_lens {v['sae_lens']}, sae-kernels commit "
        f"{(v['git_commit'] or '?')[:10]}{' (dirty tree)' if v.get('git_dirty') else ''}.",
        "",
        "| method | lr | seed | MCC | F1 | precision | recall | EV | L0 | dead |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["runs"]:
        if "metrics" not in r:
            err = str(r.get("error", "?")).replace("|", "/").replace("\n", " ")
            lines.append(f"| {r['method']} | {_lr(r['lr'])} | {r['seed']} | failed: {err} |" + " |" * 6)
            continue
        m = r["metrics"]
        lines.append(f"| {r['method']} | {_lr(r['lr'])} | {r['seed']} | {_fmt(m['mcc'])} | {_fmt(m['f1'])} "
                     f"| {_fmt(m['precision'])} | {_fmt(m['recall'])} | {_fmt(m['explained_variance'])} "
                     f"| {_fmt(m['l0'], 2)} | {m['dead_latents']} / {s['d_sae']} |")
    if doc.get("best"):
        lines += ["", "Best lr per method (highest mean MCC over seeds; mean, and min-max of MCC):", "",
                  "| method | lr | seeds | MCC | MCC min-max | F1 | precision | recall | EV | L0 | dead |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for method, b in doc["best"].items():
            m = b["mean"]
            lines.append(f"| {method} | {_lr(b['lr'])} | {len(b['seeds'])} | {_fmt(m['mcc'])} "
                         f"| {_fmt(b['min']['mcc'])}-{_fmt(b['max']['mcc'])} | {_fmt(m['f1'])} | {_fmt(m['precision'])} "
                         f"| {_fmt(m['recall'])} | {_fmt(m['explained_variance'])} | {_fmt(m['l0'], 2)} "
                         f"| {_fmt(m['dead_latents'], 1)} |")
    lines += ["", f"Command: `{doc['command']}`; wall time {doc.get('wall_seconds', 0):.0f} s.", ""]
    return "\n".join(lines)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_outputs(doc: Dict[str, Any], out: Path) -> str:
    md = markdown(doc)
    _write(out, json.dumps(doc, indent=2, default=_json_default) + "\n")
    _write(out.with_suffix(".md"), md)
    return md


def _json_default(o: Any) -> Any:
    if isinstance(o, (tuple, set)):
        return list(o)
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    return str(o)


# ----------------------------------------------------------------------------------------------- CLI

def _parse_seeds(text: str) -> List[int]:
    out = []
    for item in text.split(","):
        item = item.strip()
        try:
            out.append(int(item))
        except ValueError:
            raise ValueError(f"--seeds: expected comma-separated integers such as 42,43, got {text!r}") from None
    if not out or len(set(out)) != len(out):
        raise ValueError(f"--seeds: expected distinct integers such as 42,43, got {text!r}")
    return out


def _parse_methods(text: str) -> List[str]:
    out = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in out if m not in METHODS]
    if not out or bad:
        raise ValueError(f"--methods: expected comma-separated names from {', '.join(METHODS)}, got "
                         f"{', '.join(map(repr, bad)) if bad else repr(text)}")
    return list(dict.fromkeys(out))


def _parse_lr(item: str, text: str) -> float:
    try:
        v = float(item)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"--lrs: expected positive numbers, got {item!r} in {text!r}")
    return v


def _parse_lrs(text: str, methods: Sequence[str]) -> Dict[str, List[float]]:
    """``--lrs``: comma-separated entries, each ``LR`` (every method) or ``NAME=LR`` with NAME a method or a
    family (ours, saelens); an entry for a method replaces its family's and the plain ones."""
    plain: List[float] = []
    named: Dict[str, List[float]] = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        if "=" in item:
            name, val = (p.strip() for p in item.split("=", 1))
            if name not in METHODS and name not in FAMILIES:
                raise ValueError(f"--lrs: expected NAME=LR with NAME a method ({', '.join(METHODS)}) or a family "
                                 f"({', '.join(FAMILIES)}), got {name!r}")
            named.setdefault(name, []).append(_parse_lr(val, text))
        else:
            plain.append(_parse_lr(item, text))
    if not plain and not named:
        raise ValueError(f"--lrs: expected learning rates such as 1e-3,2e-3 or ours=2e-3,saelens=3e-4, got {text!r}")
    out = {}
    for m in methods:
        lrs = named.get(m) or named.get(m.split("-", 1)[0]) or plain
        if not lrs:
            raise ValueError(f"--lrs: no learning rate for {m} (give a plain LR, {m.split('-', 1)[0]}=LR or {m}=LR)")
        out[m] = list(dict.fromkeys(lrs))
    return out


def _positive_int(flag: str, text: str, minimum: int = 1) -> int:
    try:
        v = int(text.replace("_", ""))
    except ValueError:
        raise ValueError(f"{flag}: expected an integer >= {minimum}, got {text!r}") from None
    if v < minimum:
        raise ValueError(f"{flag}: expected an integer >= {minimum}, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    full, quick = SETTINGS["full"], SETTINGS["quick"]

    def lrs_text(s):
        return "; ".join(f"{fam} " + ",".join(map(_lr, lrs)) for fam, lrs in s["lrs"].items())

    ap = argparse.ArgumentParser(
        prog="python benchmarks/synth_vs_saelens.py",
        description="Score our SAE architectures against SAELens's on SAELens's SynthSAEBench synthetic data, "
                    "with SAELens's own evaluation (MCC, F1, precision, recall, explained variance, L0, dead latents).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(f"Settings. full (default): {full['features']} true features, d_in {full['d_in']}, {full['d_sae']} latents, "
                f"K {full['k']}, {full['samples']:,} samples, batch {full['batch_size']}, seeds 42,43, lrs {lrs_text(full)}, "
                f"{full['eval_samples']:,} evaluation samples. --quick: {quick['features']} features, d_in {quick['d_in']}, "
                f"{quick['d_sae']} latents, K {quick['k']}, {quick['samples']:,} samples, seed 42, lrs {lrs_text(quick)}, "
                f"{quick['eval_samples']:,} evaluation samples.\nThe flags above override either setting."))
    ap.add_argument("--quick", action="store_true",
                    help="the tiny setting (seconds on a CPU; what the test runs) instead of the full one")
    ap.add_argument("--seeds", default=None,
                    help="comma-separated seeds of the SAE initialisation and training stream "
                         "(default: 42,43; 42 with --quick)")
    ap.add_argument("--samples", default=None,
                    help=f"training samples per run, rounded down to whole batches (default: {full['samples']:,}; "
                         f"{quick['samples']:,} with --quick)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated methods (default: all): " + ", ".join(METHODS))
    ap.add_argument("--lrs", default=None,
                    help="learning rates: comma-separated entries, each LR (every method) or NAME=LR with NAME a "
                         "method or a family (ours, saelens), e.g. 1e-3,2e-3 or ours=2e-3,saelens=3e-4,saelens=1e-3 "
                         f"(default: {lrs_text(full)}; with --quick {lrs_text(quick)}). The best lr of a method is "
                         "the one with the highest mean MCC over the seeds")
    ap.add_argument("--batch-size", default=None,
                    help=f"samples per step, ours and SAELens's (default: {full['batch_size']})")
    ap.add_argument("--eval-samples", default=None,
                    help=f"evaluation samples (default: {full['eval_samples']:,}; {quick['eval_samples']:,} with --quick)")
    ap.add_argument("--world-seed", default="0", help="seed of the synthetic world (default: %(default)s)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    ap.add_argument("--output", default=None,
                    help="the JSON to write; the Markdown table goes next to it with the suffix .md (default: "
                         "benchmarks/results/synth-vs-saelens.json; benchmarks/results/synth-vs-saelens-quick.json "
                         "with --quick)")
    ap.add_argument("--verbose", action="store_true", help="keep SAELens's progress bars")
    return ap


def resolve_settings(a: argparse.Namespace) -> Dict[str, Any]:
    import torch

    mode = "quick" if a.quick else "full"
    s = {key: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
         for key, v in SETTINGS[mode].items()}
    s["mode"] = mode
    s["methods"] = _parse_methods(a.methods)
    if a.seeds is not None:
        s["seeds"] = _parse_seeds(a.seeds)
    if a.batch_size is not None:
        s["batch_size"] = _positive_int("--batch-size", a.batch_size)
    if a.samples is not None:
        s["samples"] = _positive_int("--samples", a.samples)
    if s["samples"] < s["batch_size"]:
        raise ValueError(f"--samples: expected at least one batch ({s['batch_size']} samples), got {s['samples']}")
    if a.eval_samples is not None:
        s["eval_samples"] = _positive_int("--eval-samples", a.eval_samples)
    try:
        s["world_seed"] = int(a.world_seed)
    except ValueError:
        raise ValueError(f"--world-seed: expected an integer, got {a.world_seed!r}") from None
    lrs = s.pop("lrs")
    if a.lrs is not None:
        s["lrs"] = _parse_lrs(a.lrs, s["methods"])
    else:
        s["lrs"] = {m: list(lrs[m.split("-", 1)[0]]) for m in s["methods"]}
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device")
        torch.empty(1, device=dev)
    except Exception as e:
        raise ValueError(f"--device: expected a usable torch device such as cpu or cuda, got {device!r} ({e})") from None
    s["device"] = device
    s["verbose"] = bool(a.verbose)
    steps = s["samples"] // s["batch_size"]
    s["steps"], s["samples"] = steps, steps * s["batch_size"]
    s["chunk_samples"] = s["batch_size"] * min(64, steps)  # the stream is sampled this many at a time
    solo, step_cfg = our_recipe(s["d_in"], s["d_sae"], s["k"], "matryoshka_batchtopk", 1e-3, steps, s["batch_size"],
                                0, device_type=dev.type)
    s["dead_window_tokens"] = step_cfg.dead_window_tokens
    s["saelens_dead_feature_window"] = saelens_dead_window_steps(step_cfg.dead_window_tokens, s["batch_size"])
    s["matryoshka_widths"] = list(step_cfg.matryoshka_widths)
    s["eval_seed"] = EVAL_SEED
    return s


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.output is not None and not a.output.endswith(".json"):
        ap.error(f"--output: expected a path ending in .json, got {a.output!r}")
    try:
        s = resolve_settings(a)
    except ValueError as e:
        ap.error(str(e))
    out = Path(a.output) if a.output else ROOT / "benchmarks" / "results" / (
        "synth-vs-saelens-quick.json" if s["mode"] == "quick" else "synth-vs-saelens.json")

    import torch

    t_start = time.perf_counter()
    device = s["device"]
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=_rng_devices(device)), _quiet(s["verbose"]):  # the orthogonalisation's progress bar
        world = make_world(s["features"], s["d_in"], s["hierarchy_roots"], s["world_seed"], device, s["ortho_steps"])
    world_s = time.perf_counter() - t0
    with torch.random.fork_rng(devices=_rng_devices(device)), torch.no_grad():
        torch.manual_seed(EVAL_SEED + 1)
        feats = world.activation_generator.sample(min(s["eval_samples"], 16384))
        true_l0 = float((feats != 0).float().sum(-1).mean())
        del feats
    # seed by seed, so that one seed's stream is sampled once and kept while its runs train
    plan = [(m, lr, seed) for seed in s["seeds"] for m in s["methods"] for lr in s["lrs"][m]]
    cmd = "python benchmarks/synth_vs_saelens.py" + ("" if not argv else " " + " ".join(argv))
    doc: Dict[str, Any] = {
        "benchmark": "synth_vs_saelens", "command": cmd, "settings": s, "versions": versions(),
        "device": device_info(device),
        "world": {"config": world.cfg.to_dict(), "true_l0": true_l0, "build_seconds": round(world_s, 2)},
        "runs": [], "best": {},
    }
    print(f"world: {s['features']} features, d_in {s['d_in']}, true L0 {true_l0:.2f} (built in {world_s:.1f} s on "
          f"{device}); {len(plan)} runs of {s['samples']:,} samples -> {out}", flush=True)
    failed = 0
    stream: Optional[Stream] = None
    with tempfile.TemporaryDirectory(prefix="synth_vs_saelens_") as tmp:
        for i, (method, lr, seed) in enumerate(plan, 1):
            if stream is None or stream.seed != seed:
                stream = None  # free the previous seed's batches first
                stream = Stream(world, s["batch_size"], seed, s["steps"], s["chunk_samples"])
            try:
                r = run_one(method, lr, seed, world, stream, s, device, Path(tmp))
                m = r["metrics"]
                print(f"[{i}/{len(plan)}] {method} lr={_lr(lr)} seed={seed}: MCC {m['mcc']:.3f} F1 {m['f1']:.3f} "
                      f"P {m['precision']:.3f} R {m['recall']:.3f} EV {m['explained_variance']:.3f} L0 {m['l0']:.2f} "
                      f"dead {m['dead_latents']}/{s['d_sae']} (train {r['train_seconds']:.1f} s, sampling "
                      f"{r['sample_seconds']:.1f} s, eval {r['eval_seconds']:.1f} s)", flush=True)
            except Exception as e:  # keep the other runs; the exit status says that one failed
                failed += 1
                r = {"method": method, "family": method.split("-", 1)[0], "lr": lr, "seed": seed,
                     "error": f"{type(e).__name__}: {e}"}
                print(f"[{i}/{len(plan)}] {method} lr={_lr(lr)} seed={seed}: FAILED {r['error']}", file=sys.stderr,
                      flush=True)
            doc["runs"].append(r)
            doc["runs"].sort(key=_run_order)
            doc["best"] = best_by_method(doc["runs"])
            doc["wall_seconds"] = round(time.perf_counter() - t_start, 2)
            write_outputs(doc, out)
    doc["wall_seconds"] = round(time.perf_counter() - t_start, 2)
    md = write_outputs(doc, out)
    print()
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')}", flush=True)
    if failed:
        print(f"{failed} of {len(plan)} runs failed (see 'error' in {out})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
