"""The CLI: --help, flag parsing, clear errors, overwrite / resume guards, the embedded default."""
import dataclasses
import json
import math
import re
from pathlib import Path

import pytest

from sae_kernels import TopKSAE
from trainer.config import TrainConfig
from trainer.run import build_parser, main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tiny_llama, tmp_path_factory):
    return tiny_llama, tmp_path_factory.mktemp("cli")


def small(model, out, *extra):
    return ["--model", model, "--layer", "1", "--context-len", "64", "--lm-batch-size", "4", "--tokens", "4096",
            "--batch-size", "256", "--buffer-tokens", "1024", "--eval-tokens", "256", "--no-progress",
            "--no-eval-lm-loss", "--output", str(out), *extra]


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f"{f.name} has no help text"
        if f.metadata.get("hidden"):  # a test hook (--stop-after-steps): accepted, not listed
            assert "--" + f.name.replace("_", "-") not in text, f.name
            continue
        assert "--" + f.name.replace("_", "-") in text, f.name
        assert f"\n{f.metadata['group']}:\n" in text, f.name  # under its group's title
    assert "--config FILE" in text


def test_help_shows_the_defaults_of_both_families_and_of_every_boolean(capsys):
    from trainer.config import EMBEDDED_DEFAULTS, RECIPE_DEFAULTS

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(re.sub(r"-\n\s+", "-", capsys.readouterr().out).split())  # unwrapped (argparse breaks at hyphens)
    text = text[text.index("options:"):]  # past the usage line
    show = lambda v: f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
    for name in ("batch_size", "buffer_tokens", "checkpoint_every", "log_every", "tokens", "lr"):
        flag = "--" + name.replace("_", "-")
        want = (f"(default: {show(EMBEDDED_DEFAULTS[name])} with the embedded model; "
                f"{show(RECIPE_DEFAULTS[name])} for other models, the Llama Scope recipe)")
        block = text[text.index(flag + " N" if name != "lr" else flag + " X"):]
        assert block[:400].find(want) != -1, f"{flag}: {block[:300]}"
    for f in dataclasses.fields(TrainConfig):
        if f.default is True or f.default is False:
            flag = "--" + f.name.replace("_", "-")
            shown = flag if f.default else "--no-" + flag[2:]
            block = text[text.index(f"{flag}, --no-{flag[2:]}"):]
            assert f"(default: {shown})" in block[:500], flag
    assert "SPEC" not in text and "README" not in text  # the help points at pages that ship: docs/*.md
    pages = set(re.findall(r"docs/[\w-]+\.md", text))
    assert "docs/training.md" in pages and all((REPO / p).is_file() for p in pages), pages


def test_flags_mirror_the_config():
    args = build_parser().parse_args(["--layer", "3", "--position", "TC", "--no-use-bos", "--auxk", "--lr", "1e-3"])
    cfg = TrainConfig(**vars(args))
    assert (cfg.layer, cfg.position, cfg.use_bos, cfg.auxk, cfg.lr) == (3, "TC", False, True, 1e-3)
    assert TrainConfig(**vars(build_parser().parse_args([]))) == TrainConfig()


def test_real_gpu_invocation_is_valid_and_uses_the_recipe():
    argv = ["--model", "meta-llama/Llama-3.1-8B", "--dataset", "some/dataset", "--layer", "15", "--position", "R",
            "--expansion", "8", "--tokens", "800000000"]
    cfg = TrainConfig(**vars(build_parser().parse_args(argv))).resolve(32, 4096, "cuda")
    assert cfg.run_name() == "L15R-8x"
    assert (cfg.batch_size, cfg.lr, cfg.buffer_tokens, cfg.context_len) == (2048, 8e-4, 500_000, 1024)
    assert cfg.total_steps == 390_625 and cfg.warmup_steps == 5000 and cfg.k_start == 2048
    assert cfg.clip_grad_norm == 0.001 and cfg.precision == "bf16" and cfg.dead_window_tokens == 10_000_000


@pytest.mark.parametrize("argv,flag", [
    (["--position", "X"], "--position"),
    (["--k", "0"], "--k"),
    (["--lr", "-1"], "--lr"),
    (["--loss", "l1"], "--loss"),
    (["--beta2", "1.5"], "--beta2"),
    (["--resume", "--overwrite"], "--resume"),
])
def test_config_errors_name_the_flag(argv, flag, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and flag in err


def test_unknown_model_and_bad_layer_and_dataset(tiny, tmp_path, capsys):
    model, _ = tiny
    assert main(small(str(tmp_path / "no-such-model"), tmp_path / "o")) == 2
    assert "--model" in capsys.readouterr().err
    assert main(small(model, tmp_path / "o") + ["--layer", "3"]) == 2
    err = capsys.readouterr().err
    assert "--layer" in err and "3 layers" in err
    assert main(small(model, tmp_path / "o", "--dataset", str(tmp_path / "missing.jsonl"))) == 2
    assert "--dataset" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(small(model, tmp_path / "o", "--dataset", str(tmp_path / "empty"))) == 2
    assert "--dataset" in capsys.readouterr().err


def test_overwrite_guard_and_resume_checks(tiny, tmp_path, capsys):
    model, _ = tiny
    out = tmp_path / "runs"
    assert main(small(model, out)) == 0
    assert (out / "L1R-8x" / "eval.json").is_file()
    capsys.readouterr()
    assert main(small(model, out)) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "L1R-8x" in err
    assert main(small(model, out, "--resume")) == 0  # finished: nothing to resume, and it says so
    err = capsys.readouterr().err
    assert f"--resume: the run in {out} is finished" in err and "nothing to resume" in err, err
    assert main(small(model, out, "--overwrite")) == 0
    # an interrupted run resumes only with the same flags
    assert main(small(model, out, "--overwrite", "--stop-after-steps", "3")) == 0
    assert main(small(model, out, "--resume", "--lr", "1e-2")) == 2
    assert "--lr" in capsys.readouterr().err
    assert main(small(model, out, "--resume")) == 0


def test_resume_refuses_another_seed(tiny, tmp_path, capsys):
    """The seed sets the init, the data order and the buffer's shuffles: --resume with another --seed would
    finish a run that no command describes. Refused (exit 2) naming --seed; the checkpoint stays as it was."""
    model, _ = tiny
    out = tmp_path / "runs"
    assert main(small(model, out, "--checkpoint-every", "2", "--stop-after-steps", "3")) == 0
    state = out / "resume" / "state.pt"
    before = state.read_bytes()
    capsys.readouterr()
    assert main(small(model, out, "--checkpoint-every", "2", "--resume", "--seed", "7")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume") and "--seed 42 -> 7" in err, err
    assert state.read_bytes() == before
    assert sorted(p.name for p in (out / "L1R-8x" / "resume").iterdir()) == ["step3.pt"]


@pytest.mark.parametrize("item", ["L1RX", "L3RX", "L1R8", "L1TCX"])
def test_a_hookpoint_with_trailing_characters_is_refused(tiny, item, capsys, monkeypatch):
    """``L1RX`` is not ``L1R``: exit status 2 naming --hookpoints and the item, before the model loads."""
    import trainer.run as R

    def no_load(*a, **k):
        raise AssertionError(f"--hookpoints {item} was accepted: the model was loaded")

    monkeypatch.setattr(R, "load_model", no_load)
    argv = small(tiny[0], tiny[1] / "trailing", "--hookpoints", item)
    argv.remove("--layer"), argv.remove("1")  # every other flag valid: only the hook point can be refused
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --hookpoints") and repr(item) in err, err


def test_an_exported_sae_without_eval_json_is_not_overwritten(tiny, tmp_path, capsys):
    """A member folder holding an exported SAE (hyperparams.json + checkpoints/final.safetensors) but no
    eval.json (evaluation never ran, or was deleted) is a run: refused without --overwrite, untouched."""
    model, _ = tiny
    out = tmp_path / "runs"
    folder = out / "L1R-8x"
    files = {"hyperparams.json": b'{"d_model": 32, "d_sae": 256}\n',
             "checkpoints/final.safetensors": b"weights that took a week",
             "lm_config.json": b"{}\n", "notes.txt": b"mine"}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    assert main(small(model, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --output") and "--overwrite" in err and str(folder) in err, err
    assert "hyperparams.json" in err
    assert {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == files
    assert sorted(p.name for p in out.iterdir()) == ["L1R-8x"]  # nothing started: no resume/, no lock left


def test_embedded_default_model_end_to_end(tmp_path):
    """The embedded SmolLM2 GGUF and the pydoc corpus, shortened (model load dominates)."""
    out = tmp_path / "emb"
    argv = ["--layer", "2", "--context-len", "64", "--tokens", "8192", "--batch-size", "256", "--lr", "4e-3",
            "--buffer-tokens", "2048", "--eval-tokens", "128", "--norm-tokens", "1024", "--expansion", "2",
            "--no-progress", "--output", str(out)]
    assert main(argv) == 0
    run_dir = out / "L2R-2x"
    res = json.loads((run_dir / "eval.json").read_text())
    assert res["l0"] == 50 and math.isfinite(res["delta_lm_loss"]) and res["d_model"] == 576
    assert 0.3 < res["explained_variance"] <= 1  # 32 steps only: a sanity check, not the quality bar
    lm_cfg = json.loads((run_dir / "lm_config.json").read_text())
    assert "SmolLM2-135M" in lm_cfg["model_name"] and lm_cfg["n_layers"] == 30
    sae = TopKSAE.from_llama_scope(run_dir)
    assert sae.cfg.d_model == 576 and sae.cfg.d_sae == 1152
