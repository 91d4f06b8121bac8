"""The command lines' parsing, no model loaded: trainer.run's flags in groups, --config files, no prefix
matching and one-line errors with a suggestion in every CLI (issue 30)."""
import dataclasses
import json
import re

import pytest

from trainer.cli.train import GROUPS, build_parser, parse_config
from trainer.config import TrainConfig

HINT = "(python -m trainer.run --help lists the flags)"

# The groups of issue 30, in --help's order, and the fields each holds.
EXPECTED = {
    "what to train": "layer position hookpoints layers positions expansion k plain_topk",
    "data": "model dataset dataset_config split text_column streaming context_len use_bos",
    "recipe": "tokens batch_size lr beta1 beta2 warmup_steps decay_fraction k_anneal_fraction k_start "
              "clip_grad_norm loss released_recipe precision seed",
    "dead latents": "auxk auxk_coef k_aux dead_window_tokens hold_dead reset_dead_moments data_init "
                    "b_dec_init_fraction recentre_dead",
    "parallelism": "tp dist_timeout device",
    "outputs": "output overwrite resume checkpoint_every log_every progress wandb wandb_project tensorboard "
               "eval_tokens eval_every eval_lm_loss eval_lm_tokens jumprelu jumprelu_tokens export_dtype",
    "advanced": "lm_batch_size buffer_tokens buffer_device norm_tokens cache_activations_gb",
}
FIELDS = dataclasses.fields(TrainConfig)
SHOWN = [f for f in FIELDS if not f.metadata.get("hidden")]


def flag(name):
    return "--" + name.replace("_", "-")


def help_sections(monkeypatch):
    """--help as {section title: [the flags it lists]}, in the order printed."""
    monkeypatch.setenv("COLUMNS", "100")
    text = build_parser().format_help()
    sections, current = {}, None
    for line in text.splitlines():
        if re.fullmatch(r"[a-z][\w ]*:", line):
            current = line[:-1]
            assert current not in sections, f"section {current!r} printed twice"
            sections[current] = []
        elif current is not None and (m := re.match(r"  (-[\w-]+)", line)):
            sections[current].append(m.group(1))
    return text, sections


def test_every_field_names_a_group_of_the_issue():
    assert list(GROUPS) == list(EXPECTED)
    for f in FIELDS:
        assert f.metadata.get("group") in GROUPS, f"{f.name}: no group (or an unknown one) in its metadata"
    for group, names in EXPECTED.items():
        for name in names.split():
            assert TrainConfig.__dataclass_fields__[name].metadata["group"] == group, name
    assert {f.name for f in FIELDS if f.metadata.get("hidden")} == {"stop_after_steps"}


def test_help_lists_every_flag_once_in_its_group_in_order(monkeypatch):
    text, sections = help_sections(monkeypatch)
    assert list(sections) == ["options", "config", *GROUPS]
    assert sections["config"] == ["--config"]
    listed = [fl for s in sections.values() for fl in s]
    for f in SHOWN:
        assert listed.count(flag(f.name)) == 1, f.name
        assert flag(f.name) in sections[f.metadata["group"]], (f.name, f.metadata["group"])
    for title, line in GROUPS.items():
        assert line.split()[0] in text.split(f"\n{title}:\n", 1)[1].split("\n\n")[0]  # its one-line description
    assert len(text.split("usage:", 1)[1].split("\n\n")[0].splitlines()) == 1  # a short usage line


def test_help_texts_give_the_defaults(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    text = build_parser().format_help()
    lines = {m.group(1): " ".join(m.group(0).split())  # each flag's entry, unwrapped
             for m in re.finditer(r"^  (--[\w-]+).*?(?=^  -|^\S|\Z)", text, re.M | re.S)}
    assert "(default: --use-bos)" in lines["--use-bos"] and "(default: --no-jumprelu)" in lines["--jumprelu"]
    assert ("(default: 1024 with the embedded model; 2048 for other models, the Llama Scope recipe)"
            in lines["--batch-size"])
    assert "(default: 50)" in lines["--k"] and "(default: 0.001)" in lines["--clip-grad-norm"]
    assert "%%" not in text and "%(" not in text and "min(5000, 5% of the steps)" in lines["--warmup-steps"]


def test_stop_after_steps_is_hidden_but_accepted(monkeypatch):
    text, _ = help_sections(monkeypatch)
    assert "--stop-after-steps" not in text
    assert build_parser().parse_args(["--stop-after-steps", "3"]).stop_after_steps == 3


def test_the_namespace_holds_exactly_the_fields(tmp_path):
    assert set(vars(build_parser().parse_args([]))) == {f.name for f in FIELDS}
    path = tmp_path / "c.json"
    path.write_text('{"k": 20}')
    assert set(vars(build_parser().parse_args(["--config", str(path)]))) == {f.name for f in FIELDS}
    assert parse_config([]) == TrainConfig()


def _one_line_error(capsys, fn, argv):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error: ") and out.err.count("\n") == 1, out.err
    return out.err.rstrip("\n")


def test_a_typo_is_one_line_with_a_suggestion(capsys):
    from trainer.run import main

    err = _one_line_error(capsys, main, ["--hookpoint", "L3R"])
    assert err == f"error: unrecognized argument --hookpoint; did you mean --hookpoints? {HINT}"
    assert _one_line_error(capsys, main, ["--hookpoint=L3R"]) == err
    assert _one_line_error(capsys, main, ["--no-progres"]) == (
        f"error: unrecognized argument --no-progres; did you mean --no-progress? {HINT}")
    err = _one_line_error(capsys, main, ["--lrr", "1e-3", "--layr", "3"])
    assert "--lrr (did you mean --lr?), --layr (did you mean --layer?)" in err
    err = _one_line_error(capsys, main, ["--stop-after-step", "3"])  # the hidden test hook is not suggested
    assert err == f"error: unrecognized argument --stop-after-step {HINT}"


@pytest.mark.parametrize("argv,want", [
    (["--batch-size", "x"], "error: --batch-size: invalid int value: 'x'"),
    (["--k"], "error: --k: expected one argument"),
    (["--lr", "fast"], "error: --lr: invalid float value: 'fast'"),
    (["--use-bos=no"], "error: --use-bos/--no-use-bos: ignored explicit argument 'no'"),
])
def test_other_argparse_errors_are_one_line_naming_the_flag(argv, want, capsys):
    from trainer.run import main

    assert _one_line_error(capsys, main, argv) == f"{want} {HINT}"


def test_no_prefix_matching_in_any_cli(capsys):
    from trainer.analyze.cli import build_parser as analyze_parser, main as analyze
    from trainer.analyze.compare_cli import build_parser as compare_parser
    from trainer.evaluate.cli import build_parser as evaluate_parser, main as evaluate
    from trainer.run import main

    for make in (build_parser, analyze_parser, compare_parser, evaluate_parser):
        assert make().allow_abbrev is False
    assert "--hookpoint;" in _one_line_error(capsys, main, ["--hookpoint", "L3R"])  # not a silent --hookpoints
    assert _one_line_error(capsys, main, ["--eval-lm", "--no-progress"]).startswith(
        "error: unrecognized argument --eval-lm;")
    assert _one_line_error(capsys, analyze, ["runs/x", "--to", "5"]) == (
        "error: unrecognized argument --to; did you mean --top? (python -m trainer.analyze --help lists the flags)")
    assert _one_line_error(capsys, analyze, ["compare", "a", "b", "--thresh", "0.5"]) == (
        "error: unrecognized argument --thresh; did you mean --threshold? "
        "(python -m trainer.analyze compare --help lists the flags)")
    assert _one_line_error(capsys, evaluate, ["runs/x", "--lm-token", "5"]) == (
        "error: unrecognized argument --lm-token; did you mean --lm-tokens? "
        "(python -m trainer.evaluate --help lists the flags)")
    assert _one_line_error(capsys, evaluate, ["runs/x", "--tokens", "x"]).startswith(
        "error: --tokens: invalid int value: 'x'")


# ----------------------------------------------------------------------------------- --config

FLAGS = ["--layer", "3", "--position", "M", "--expansion", "8,32", "--k", "32", "--lr", "4e-4", "--no-use-bos",
         "--auxk", "--batch-size", "512", "--dataset", "data.jsonl", "--tokens", "100000", "--dist-timeout", "60",
         "--dataset-config", "en"]
FILES = {
    "run.json": json.dumps({"layer": 3, "position": "M", "expansion": [8, 32], "k": 32, "lr": 4e-4, "use-bos": False,
                            "auxk": True, "batch_size": 512, "dataset": "data.jsonl", "tokens": 100000,
                            "dist-timeout": 60, "dataset_config": "en"}),
    # YAML reads 8e-4 without a dot as text: read as --lr reads it
    "run.yaml": "layer: 3\nposition: M\nexpansion: 8,32\nk: 32\nlr: 4e-4\nuse-bos: false\nauxk: true\n"
                "batch_size: 512\ndataset: data.jsonl\ntokens: 100_000\ndist-timeout: 60\ndataset_config: en\n",
    "run.yml": "layer: 3\nposition: M\nexpansion: [8, 32]\nk: 32\nlr: 0.0004\nuse_bos: no\nauxk: yes\n"
               "batch-size: 512\ndataset: data.jsonl\ntokens: 100000\ndist_timeout: 60.0\ndataset-config: en\n",
    "run.toml": 'layer = 3\nposition = "M"\nexpansion = [8, 32]\nk = 32\nlr = 4e-4\nuse-bos = false\nauxk = true\n'
                'batch_size = 512\ndataset = "data.jsonl"\ntokens = 100_000\ndist-timeout = 60\n'
                'dataset_config = "en"\n',
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_a_config_file_gives_the_config_of_the_same_flags(name, tmp_path):
    path = tmp_path / name
    path.write_text(FILES[name])
    want = parse_config(FLAGS)
    assert want != TrainConfig() and want.expansion == [8, 32] and want.use_bos is False
    assert parse_config(["--config", str(path)]) == want
    assert parse_config([f"--config={path}"]) == want


def test_flags_override_the_file_wherever_they_stand(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(FILES["run.yaml"])
    for argv in (["--config", str(path), "--k", "64", "--use-bos", "--lr", "1e-3"],
                 ["--k", "64", "--config", str(path), "--use-bos", "--lr", "1e-3"]):
        cfg = parse_config(argv)
        assert (cfg.k, cfg.use_bos, cfg.lr, cfg.layer, cfg.batch_size) == (64, True, 1e-3, 3, 512)
    p = build_parser()  # the file's settings do not stay in the parser
    p.parse_args(["--config", str(path)])
    assert TrainConfig(**vars(p.parse_args([]))) == TrainConfig()


@pytest.mark.parametrize("text,name,key,near", [
    ('{"layer": 3, "hookpoint": "L3R"}', "c.json", "'hookpoint'", "; did you mean 'hookpoints'?"),
    ("batch-sise: 512\n", "c.yaml", "'batch-sise'", "; did you mean 'batch-size'?"),
    ('lr = 1e-3\nwarmup = 10\n', "c.toml", "'warmup'", "; did you mean 'warmup_steps'?"),
])
def test_an_unknown_key_is_refused_naming_the_file_the_key_and_the_nearest_field(text, name, key, near, tmp_path,
                                                                                 capsys, monkeypatch):
    import trainer.run as R

    monkeypatch.setattr(R, "run", lambda *a, **k: pytest.fail("the run started"))
    path = tmp_path / name
    path.write_text(text)
    err = _one_line_error(capsys, R.main, ["--config", str(path)])
    assert err == f"error: --config {path}: unknown key {key}{near} {HINT}"


@pytest.mark.parametrize("name,text,want", [
    ("c.json", '{"batch_size": "many"}', "'batch_size': expected an integer, got 'many'"),
    ("c.json", '{"k": null}', "'k': expected a value, got null"),
    ("c.json", '{"use_bos": "yes"}', "'use_bos': expected true or false, got 'yes'"),
    ("c.json", '{"lr": true}', "'lr': expected a number, got True"),
    ("c.json", '{"k": 5, "k": 6', "not valid JSON"),
    ("c.json", '[1, 2]', "expected a mapping of settings"),
    ("c.json", '{"k": 5, "use-bos": true, "use_bos": false}', "'use_bos' is given twice"),
    ("c.yaml", "k: [1\n", "not valid YAML"),
    ("c.toml", "k = \n", "not valid TOML"),
    ("c.ini", "k = 5\n", "expected a .json, .yaml, .yml or .toml file"),
])
def test_a_bad_file_is_refused_naming_it(name, text, want, tmp_path, capsys):
    path = tmp_path / name
    path.write_text(text)
    err = _one_line_error(capsys, parse_config, ["--config", str(path)])
    assert err.startswith(f"error: --config {path}: ") and want in err, err
    err = _one_line_error(capsys, parse_config, ["--config", str(tmp_path / "missing.yaml")])
    assert "missing.yaml: no such file" in err
    err = _one_line_error(capsys, parse_config, ["--config", str(path), "--config", str(path)])
    assert err.startswith("error: --config: expected one file, got 2")


def test_config_values_are_checked_by_the_config(tmp_path, capsys):
    """The file's values meet TrainConfig's checks, as the flags' do (main: exit 2 naming the flag)."""
    from trainer.run import main

    path = tmp_path / "c.json"
    path.write_text('{"position": "X"}')
    assert main(["--config", str(path)]) == 2
    assert capsys.readouterr().err.startswith("error: --position")


def test_a_run_folders_train_config_json_is_a_config_file_as_is(tmp_path):
    """What a run writes, resolved (every field: the runtime ones too) and written as the run writes it."""
    argv = ["--model", "meta-llama/Llama-3.1-8B", "--dataset", "some/dataset", "--layers", "0-8:4", "--positions",
            "R,M", "--expansion", "8,32", "--tokens", "800000000", "--overwrite", "--stop-after-steps", "3",
            "--no-progress", "--output", str(tmp_path / "runs")]
    suite = parse_config(argv).resolve(32, 4096, "cuda")
    assert suite.precision == "bf16" and suite.warmup_steps == 5000 and suite.layers == "0,4,8"
    member = suite.solo(suite.members()[0], 4096)
    for cfg, path in ((suite, tmp_path / "runs" / "resume" / "train_config.json"),
                      (member, tmp_path / "runs" / member.run_name() / "train_config.json")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        assert parse_config(["--config", str(path)]) == cfg
        again = parse_config(["--config", str(path), "--no-overwrite", "--output", str(tmp_path / "again")])
        assert again == dataclasses.replace(cfg, overwrite=False, output=str(tmp_path / "again"))
    embedded = TrainConfig(resume=True).resolve(30, 576, "cpu")  # the embedded default, with a null field
    path = tmp_path / "embedded.json"
    path.write_text(json.dumps(embedded.to_dict()))
    assert embedded.dataset_config is None and parse_config(["--config", str(path)]) == embedded
