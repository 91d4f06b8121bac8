"""Suites (docs/method.md sec. 10): many SAEs from one LM pass, each member exactly the SAE trained alone.

On a tiny random Llama: a suite of L1R, L2R and L2TC at two widths (six members, four hook points)
equals, member by member and bitwise, the six SAEs trained alone with the same flags and seed; a suite
stopped mid-way and resumed equals the uninterrupted suite; bad specs are refused before the model
loads, naming the flag and the item; a buffer that cannot fit is refused with its size. The 2-rank
suite is in test_trainer_layouts.py.
"""
import csv
import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import TrainConfig
from helpers import assert_refused_before_load
from trainer.run import main, run
from trainer.train import Trainer

SUITE = dict(hookpoints="L1R,L2R,L2TC", expansion="4,8")
NAMES = ["L1R-4x", "L1R-8x", "L2R-4x", "L2R-8x", "L2TC-4x", "L2TC-8x"]


@pytest.fixture(scope="module")
def tiny(tiny_llama, tmp_path_factory):
    return tiny_llama, tmp_path_factory.mktemp("suite")


def cfg(tiny, out, **kw):
    model, root = tiny
    base = dict(model=model, k=8, context_len=64, lm_batch_size=4, tokens=4096, batch_size=256, buffer_tokens=1024,
                eval_tokens=256, eval_lm_tokens=128, progress=False, export_dtype="float32", log_every=4,
                checkpoint_every=5, output=str(root / out))
    base.update(kw)
    return TrainConfig(**base)


quiet = lambda s: None  # noqa: E731


@pytest.fixture(scope="module")
def suite(tiny):
    logs = []
    res = run(cfg(tiny, "suite", **SUITE), log=logs.append)
    return res, "\n".join(logs)


def metrics_lines(run_dir):
    return [{k: v for k, v in json.loads(ln).items() if k != "tokens_per_s"}
            for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_every_member_equals_its_run_alone(tiny, suite):
    res, _ = suite
    root = tiny[1]
    assert list(res["members"]) == NAMES
    assert res["suite"]["hook_points"] == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post",
                                           "blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out"]
    clean = {r["ce_clean"] for r in res["members"].values()}
    assert len(clean) == 1  # one clean LM pass serves every member
    for name in NAMES:
        layer, pos, exp = int(name[1]), name[2:name.index("-")], int(name.split("-")[1][:-1])
        alone = run(cfg(tiny, f"alone-{name}", layer=layer, position=pos, expansion=exp), log=quiet)["members"][name]
        mine, theirs = root / "suite" / name, root / f"alone-{name}" / name
        a, b = load_file(str(mine / "checkpoints/final.safetensors")), load_file(str(theirs / "checkpoints/final.safetensors"))
        for key in b:
            assert torch.equal(a[key], b[key]), f"{name} {key}: max diff {(a[key] - b[key]).abs().max():.3g}"
        # the member's folder is what a run alone writes
        for f in ("train_config.json", "hyperparams.json", "lm_config.json"):
            ours, alone_json = (json.loads((d / f).read_text()) for d in (mine, theirs))
            if f == "train_config.json":  # the same flags, but for where the run writes
                assert (ours.pop("output"), alone_json.pop("output")) == (str(root / "suite"), str(root / f"alone-{name}"))
            assert ours == alone_json, f"{name} {f}"
        assert metrics_lines(mine) == metrics_lines(theirs)
        got = res["members"][name]
        for key in ("explained_variance", "explained_variance_per_token", "l0", "dead_latents_eval",
                    "dead_latents_train", "latents_died_train", "death_events_train", "delta_lm_loss", "ce_score",
                    "ce_zero_ablation"):
            assert got[key] == alone[key], (name, key)
        assert got["dead_latents_train"] <= got["latents_died_train"] <= got["death_events_train"]
        # the LM ran once per context, as for one SAE (not once per member: that would be 6x). The producer
        # thread holds the next LM batch while it waits for free slots, so when training ends it may or may
        # not have run one more batch: a count that depends on timing, up to one LM batch (4 x 64 tokens).
        assert abs(got["lm_tokens"] - alone["lm_tokens"]) <= 4 * 64, (got["lm_tokens"], alone["lm_tokens"])
        assert not (mine / "resume").exists()


def cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def test_members_of_one_width_start_apart(tiny, suite):
    """Each member is seeded by the run's seed and its own name (trainer/members.py member_seed): L1R-4x,
    L2R-4x and L2TC-4x have the same shapes, and in the suite's output their decoders are unrelated. One
    seed for every member would start them alike, and 16 small steps leave them nearly identical (the
    equality with the runs alone above cannot see it: those are seeded by the same function)."""
    out = tiny[1] / "suite"
    for width in (4, 8):
        names = [f"L1R-{width}x", f"L2R-{width}x", f"L2TC-{width}x"]
        w = {n: load_file(str(out / n / "checkpoints/final.safetensors"))["decoder.weight"] for n in names}
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                cos = cosine(w[a], w[b])
                assert abs(cos) < 0.5, f"{a} and {b}: decoders at cosine {cos:.4f} (started alike?)"


def test_member_init_is_a_function_of_the_seed_and_the_name_only(tmp_path):
    """The initial weights, straight from build_members: apart for two hook points of one width, the same
    for one member in another suite, apart for another --seed."""
    from trainer.config import TrainConfig
    from trainer.members import Columns, build_members
    from trainer.parallel import ParallelContext

    def init(seed=42, **spec):
        c = TrainConfig(model="unused", k=8, tokens=4096, batch_size=256, buffer_tokens=1024, eval_tokens=256,
                        progress=False, seed=seed, output=str(tmp_path), **spec).resolve(3, 32, "cpu")
        specs = c.members()
        ms = build_members(c, specs, [ParallelContext()] * len(specs), Columns([m.site for m in specs]),
                           {m.name: {"in": 1.0, "out": 1.0, "tokens": 1} for m in specs}, d_model=32,
                           model_name="unused", device=torch.device("cpu"), out=tmp_path)
        return {m.name: {k: v.detach().clone() for k, v in m.step.sae.state_dict().items()} for m in ms}

    suite = init(hookpoints="L1R,L2R,L2TC", expansion="4,8")
    for width in (4, 8):
        a, b, c = (suite[f"{s}-{width}x"]["W_enc"] for s in ("L1R", "L2R", "L2TC"))
        same = [(x, y) for (x, wx), (y, wy) in itertools.combinations([("L1R", a), ("L2R", b), ("L2TC", c)], 2)
                if torch.equal(wx, wy)]
        assert not same, f"{width}x: identical initial W_enc for {same}"
    alone = init(layer=2, position="R", expansion=8)["L2R-8x"]
    for key in alone:
        assert torch.equal(alone[key], suite["L2R-8x"][key]), key
    other = init(seed=43, layer=2, position="R", expansion=8)["L2R-8x"]
    assert not torch.equal(other["W_enc"], alone["W_enc"])


def test_suite_outputs(tiny, suite):
    res, log = suite
    out = tiny[1] / "suite"
    data = json.loads((out / "suite.json").read_text())
    assert [m["name"] for m in data["members"]] == NAMES
    for m in data["members"]:
        assert m["folder"] == str(out / m["name"]) and m["l0"] == 8
        assert {"explained_variance", "delta_lm_loss", "ce_score", "dead_latents_eval"} <= set(m)
    assert set(data["seconds"]) >= {"load_model", "train", "lm_forward", "sae_steps", "eval", "total"}
    rows = list(csv.DictReader((out / "suite.csv").read_text().splitlines()))
    assert [r["name"] for r in rows] == NAMES
    table = (out / "suite.md").read_text()
    assert table.startswith("| member | EV | L0 | delta LM loss | CE score |") and all(n in table for n in NAMES)
    assert table.strip() in log  # the CLI prints it
    assert (out / "suite.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "resume").exists()


def test_stopped_suite_resumes_exactly(tiny, suite):
    root = tiny[1]
    assert run(cfg(tiny, "cut", **SUITE, stop_after_steps=7), log=quiet) == {"stopped": 7}
    state = torch.load(root / "cut" / Trainer.STATE_FILE, weights_only=True)
    assert state["step"] == 7
    assert sorted(state["members"]) == sorted(NAMES)
    for name in NAMES:  # one state per member, the buffer once (resume/buffer-*.safetensors)
        torch.load(root / "cut" / name / "resume" / f"step{state['step']}.pt", weights_only=True)
    assert len(list((root / "cut" / "resume").glob("buffer-*.safetensors"))) == 1
    # the checkpoint of step 5 is gone: each member keeps only its latest state, the root only its shards
    for name in NAMES:
        assert sorted(p.name for p in (root / "cut" / name / "resume").iterdir()) == ["step7.pt"], name
    assert [p.name for p in (root / "cut" / "resume").glob("buffer-*")] == ["buffer-step7-rank0-of1.safetensors"]
    run(cfg(tiny, "cut", **SUITE, resume=True), log=quiet)
    for name in NAMES:
        a = load_file(str(root / "suite" / name / "checkpoints/final.safetensors"))
        b = load_file(str(root / "cut" / name / "checkpoints/final.safetensors"))
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
        assert metrics_lines(root / "suite" / name) == metrics_lines(root / "cut" / name)


@pytest.mark.parametrize("argv,flag,item", [
    (["--hookpoints", "L99R"], "--hookpoints", "L99R"),
    (["--hookpoints", "L1R,L3X"], "--hookpoints", "L3X"),
    (["--hookpoints", ""], "--hookpoints", "empty list"),
    (["--hookpoints", "L1R,L1R"], "--hookpoints", "L1R"),
    (["--layer", "1", "--hookpoints", "L1R"], "--layer and --hookpoints", "one of them"),
    (["--layers", "0-5"], "--layers", "0-5"),
    (["--layers", "2-1"], "--layers", "2-1"),
    (["--layers", "all", "--positions", "R,X"], "--positions", "X"),
    (["--positions", ""], "--positions", "empty list"),
    (["--expansion", "8,0"], "--expansion", "0"),
    (["--k", "4,4"], "--k", "4"),
    (["--k", "4,x"], "--k", "x"),
])
def test_bad_specs_are_refused_before_the_model_loads(tiny, argv, flag, item, capsys, monkeypatch):
    assert_refused_before_load(tiny[0], tiny[1] / "bad", argv, flag, item, capsys, monkeypatch)


def test_a_buffer_that_does_not_fit_is_refused(tiny, capsys):
    argv = ["--model", tiny[0], "--layers", "all", "--positions", "R,A,M,TC", "--buffer-tokens", str(10**12),
            "--context-len", "64", "--output", str(tiny[1] / "huge"), "--no-progress"]  # (the tiny Llama: 512 at most)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--buffer-tokens" in err and "GiB" in err and "15 hook point column blocks" not in err
    assert "12 hook point column blocks" in err  # 3 layers x (resid, attn, mlp out, ln2 input): shared columns


def test_k_sweep_members_equal_their_runs_alone(tiny):
    """--k 4,8: one member per K from one LM pass, named -k{K}, each bitwise the SAE trained alone with
    that K; suite.md and suite.csv give each member's K."""
    root = tiny[1]
    res = run(cfg(tiny, "ksweep", hookpoints="L1R", expansion=4, k="4,8"), log=quiet)
    names = ["L1R-4x-k4", "L1R-4x-k8"]
    assert list(res["members"]) == names
    for name, k in zip(names, (4, 8)):
        alone = run(cfg(tiny, f"alone-k{k}", layer=1, position="R", expansion=4, k=k), log=quiet)["members"]["L1R-4x"]
        mine, theirs = root / "ksweep" / name, root / f"alone-k{k}" / "L1R-4x"
        a, b = load_file(str(mine / "checkpoints/final.safetensors")), load_file(str(theirs / "checkpoints/final.safetensors"))
        for key in b:
            assert torch.equal(a[key], b[key]), f"{name} {key}"
        ours, theirs_cfg = (json.loads((d / "train_config.json").read_text()) for d in (mine, theirs))
        ours.pop("output"), theirs_cfg.pop("output")
        assert ours == theirs_cfg and ours["k"] == k
        assert metrics_lines(mine) == metrics_lines(theirs)
        got = res["members"][name]
        assert got["k"] == k and got["explained_variance"] == alone["explained_variance"] and got["l0"] == alone["l0"]
    rows = list(csv.DictReader((root / "ksweep" / "suite.csv").read_text().splitlines()))
    assert [(r["name"], r["k"]) for r in rows] == [("L1R-4x-k4", "4"), ("L1R-4x-k8", "8")]
    assert (root / "ksweep" / "suite.md").read_text().startswith("| member | K | EV |")
    # stopped mid-way and resumed: the same sweep
    sweep = dict(hookpoints="L1R", expansion=4, k="4,8")
    assert run(cfg(tiny, "ksweep-cut", **sweep, stop_after_steps=7), log=quiet) == {"stopped": 7}
    run(cfg(tiny, "ksweep-cut", **sweep, resume=True), log=quiet)
    for name in names:
        a = load_file(str(root / "ksweep" / name / "checkpoints/final.safetensors"))
        b = load_file(str(root / "ksweep-cut" / name / "checkpoints/final.safetensors"))
        assert all(torch.equal(a[key], b[key]) for key in a), name
    png = (root / "ksweep" / "sweep.png").read_bytes()  # EV and delta LM loss against L0
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not (root / "suite" / "sweep.png").exists() if (root / "suite").exists() else True
