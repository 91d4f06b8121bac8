"""``--wandb`` and ``--tensorboard`` (issue 30): one tracker run per suite, keys ``<member>/<metric>`` against
the step (``<member>/tokens`` beside them), the run's config, each member's held-out metrics at the end as
``<member>/eval/<metric>``; a missing package is one line naming the flag, before the model loads. And the
pictures: every member's ``training.png``, and ``suite.png`` of a suite at one layer drawn as bars.

W&B runs for real with ``WANDB_MODE=offline`` (no network, no login), its ``.wandb`` file read back; the
TensorBoard tracker runs against a recording ``SummaryWriter`` with torch's signatures (tensorboard is not
a dependency), and against the real one where tensorboard is installed."""
import json
import struct
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

import trainer.report as report
import trainer.run as R
from trainer.config import TrainConfig
from trainer.track import Trackers, check_trackers, open_trackers


def cfg(model, out, **kw):
    """8 steps of 256 tokens, a metrics line every 2 steps, no LM-loss evaluation: ~2 s."""
    base = dict(model=model, layer=1, context_len=64, lm_batch_size=4, tokens=2048, batch_size=256,
                buffer_tokens=1024, eval_tokens=256, k=8, log_every=2, progress=False, eval_lm_loss=False,
                output=str(out))
    base.update(kw)
    return TrainConfig(**base)


def metrics_lines(folder):
    return [json.loads(ln) for ln in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def spy_plot_suite(mp):
    """The kinds ``plot_suite`` drew ("bars" / "lines"), as the run calls it."""
    kinds, real = [], report.plot_suite

    def plot(suite, path):
        kinds.append(real(suite, path))
        return kinds[-1]

    mp.setattr(report, "plot_suite", plot)
    return kinds


# --------------------------------------------------------------------------------------------- W&B


def wandb_records(path):
    """The records of an offline run's ``.wandb`` file (W&B's LevelDB-style log: a 7-byte file header, then
    32 KiB blocks of chunks, each ``crc32 u32, length u16, type u8`` + data; 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf = Path(path).read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def _key(item):
    return item.key or "/".join(item.nested_key)


@pytest.fixture(scope="module")
def wandb_suite(tiny_llama, tmp_path_factory):
    """A suite of two widths at layer 1 with ``--wandb`` offline: its folder, results, what suite.png drew."""
    pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("wandb")
    mp = pytest.MonkeyPatch()
    try:
        for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(var, str(root / var.lower()))
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.delenv("WANDB_API_KEY", raising=False)
        kinds = spy_plot_suite(mp)
        out = root / "suite-a"
        lines = []
        result = R.run(cfg(tiny_llama, out, expansion="4,8", wandb=True, wandb_project="trk-test"), log=lines.append)
    finally:
        mp.undo()
    return out, result, kinds, lines


def test_wandb_offline_one_run_per_suite_with_namespaced_keys_against_the_step(wandb_suite):
    out, result, _, lines = wandb_suite
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # one run for the suite, in <output>/wandb
    assert any(ln.startswith("--wandb: run 'suite-a' in project 'trk-test'") for ln in lines), lines
    files = list(runs[0].glob("*.wandb"))
    assert len(files) == 1
    records = list(wandb_records(files[0]))
    kinds = [r.WhichOneof("record_type") for r in records]

    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.display_name, run.project) == ("suite-a", "trk-test")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["k"] == 8 and config["expansion"] == [4, 8] and config["output"] == str(out)
    assert config["wandb"] is True and config["wandb_project"] == "trk-test"

    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {_key(i): json.loads(i.value_json) for i in r.history.item}
            history[r.history.step.num] = items
    members = ("L1R-4x", "L1R-8x")
    want_steps = [rec["step"] for rec in metrics_lines(out / members[0])]
    assert sorted(history) == want_steps == [2, 4, 6, 8]  # the x axis is the step: one point per metrics line
    for name in members:
        for rec in metrics_lines(out / name):
            got = history[rec["step"]]
            for key, v in rec.items():
                if key != "step":
                    assert got[f"{name}/{key}"] == pytest.approx(v), (name, key)
            assert got[f"{name}/tokens"] == rec["tokens"] == rec["step"] * 256
            assert f"{name}/step" not in got
    # the end: every member's held-out metrics in the run summary, under <member>/eval/, and the run finished
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
    for name in members:
        ev = json.loads((out / name / "eval.json").read_text())
        assert ev == result["members"][name]
        for key in ("explained_variance", "l0", "dead_latents_eval", "dead_latents_train", "d_sae", "mse"):
            assert summary[f"{name}/eval/{key}"] == pytest.approx(ev[key]), key
        assert summary[f"{name}/eval/seconds/total"] == pytest.approx(ev["seconds"]["total"])
        # the training curve's last value stays its own key, not overwritten by the held-out one
        last = metrics_lines(out / name)[-1]
        assert summary[f"{name}/explained_variance"] == pytest.approx(last["explained_variance"])
    exit_rec = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert kinds[-1] == "exit" and exit_rec[-1].exit_code == 0


def test_every_member_gets_its_training_png(wandb_suite):
    out = wandb_suite[0]
    for name in ("L1R-4x", "L1R-8x"):
        png = out / name / "training.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] > 1000 and im.size[1] > 200, im.size
    # no stray temporary files of the atomic writes
    assert not [p for p in out.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]


def test_a_suite_at_one_layer_is_drawn_as_bars(wandb_suite, tmp_path):
    out, _, kinds, _ = wandb_suite
    assert kinds == ["bars"]  # two widths at L1R: one bar per member, not lone dots on a layer axis
    suite = json.loads((out / "suite.json").read_text())
    # the same members at two layers: the layer axis, one line per width
    spread = dict(suite, members=[dict(m, layer=layer, name=f"L{layer}R-{m['expansion']}x")
                                  for layer in (0, 2) for m in suite["members"]])
    assert report.plot_suite(spread, tmp_path / "lines.png") == "lines"
    assert report.plot_suite(suite, tmp_path / "bars.png") == "bars"
    with Image.open(tmp_path / "lines.png") as a, Image.open(tmp_path / "bars.png") as b:
        assert a.size != b.size or a.tobytes() != b.tobytes()
    with Image.open(out / "suite.png") as im:
        assert im.format == "PNG" and im.size == (1600, 400)


# ----------------------------------------------------------------------------------------- TensorBoard


class RecordingWriter:
    """``torch.utils.tensorboard.SummaryWriter``'s methods the tracker uses, with torch's signatures and its
    hparams type check; every call recorded."""

    made = []

    def __init__(self, log_dir=None, comment="", purge_step=None, max_queue=10, flush_secs=120, filename_suffix=""):
        self.log_dir, self.calls, self.closed = log_dir, [], False
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        RecordingWriter.made.append(self)

    def add_scalar(self, tag, scalar_value, global_step=None, walltime=None, new_style=False, double_precision=False):
        assert not self.closed and isinstance(tag, str)
        self.calls.append(("scalar", tag, float(scalar_value), global_step))

    def add_text(self, tag, text_string, global_step=None, walltime=None):
        assert not self.closed and isinstance(text_string, str)
        self.calls.append(("text", tag, text_string, global_step))

    def add_hparams(self, hparam_dict, metric_dict, hparam_domain_discrete=None, run_name=None, global_step=None):
        assert type(hparam_dict) is dict and type(metric_dict) is dict
        for k, v in hparam_dict.items():  # torch.utils.tensorboard.summary.hparams refuses other types
            assert v is None or isinstance(v, (bool, int, float, str)), (k, v)
        assert all(isinstance(v, (int, float)) for v in metric_dict.values())
        self.calls.append(("hparams", hparam_dict, metric_dict, run_name))

    def flush(self):
        pass

    def close(self):
        self.closed = True


@pytest.fixture
def fake_tensorboard(monkeypatch):
    RecordingWriter.made = []
    mod = types.ModuleType("torch.utils.tensorboard")
    mod.SummaryWriter = RecordingWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", mod)
    return RecordingWriter.made


def test_tensorboard_scalars_per_step_hparams_at_the_end_and_resume_replays_the_curve(tiny_llama, tmp_path,
                                                                                     fake_tensorboard, monkeypatch):
    kinds = spy_plot_suite(monkeypatch)
    out = tmp_path / "single"
    # a single SAE stopped (as if killed) after step 4, then resumed: the new writer holds the whole curve
    assert R.run(cfg(tiny_llama, out, expansion="4", tensorboard=True, checkpoint_every=2, stop_after_steps=4),
                 log=lambda s: None) == {"stopped": 4}
    first = fake_tensorboard[0]
    assert first.closed and Path(first.log_dir) == out / "tensorboard"
    assert sorted({c[3] for c in first.calls if c[0] == "scalar"}) == [2, 4]
    result = R.run(cfg(tiny_llama, out, expansion="4", tensorboard=True, checkpoint_every=2, resume=True),
                   log=lambda s: None)
    assert len(fake_tensorboard) == 2
    w = fake_tensorboard[1]
    assert w.closed and Path(w.log_dir) == out / "tensorboard"
    lines = metrics_lines(out / "L1R-4x")
    assert [r["step"] for r in lines] == [2, 4, 6, 8]
    scalars = {(c[1], c[3]): c[2] for c in w.calls if c[0] == "scalar"}
    for rec in lines:
        for key, v in rec.items():
            if key != "step":
                assert scalars[f"L1R-4x/{key}", rec["step"]] == pytest.approx(v), (key, rec["step"])
    steps = [c[3] for c in w.calls if c[0] == "scalar" and c[1] == "L1R-4x/loss"]
    assert steps == [2, 4, 6, 8]  # replayed 2, 4 first, then the resumed lines, in step order
    hp = [c for c in w.calls if c[0] == "hparams"]
    assert len(hp) == 1
    _, hparams, metrics, run_name = hp[0]
    assert run_name == "." and hparams["k"] == 8 and hparams["expansion"] == 4 and "hookpoints" not in hparams
    ev = result["members"]["L1R-4x"]
    for key in ("explained_variance", "l0", "dead_latents_eval", "d_sae"):
        assert metrics[f"L1R-4x/eval/{key}"] == pytest.approx(ev[key])
    texts = {c[1]: c[2] for c in w.calls if c[0] == "text"}
    assert "L1R-4x" in texts["eval"] and '"k": 8' in texts["config"]
    # the pictures of a single SAE: its training.png (the resumed run's whole curve) and suite.png as bars
    assert kinds == ["bars"]
    with Image.open(out / "L1R-4x" / "training.png") as im:
        assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0


def test_tensorboard_event_files_when_tensorboard_is_installed(tiny_llama, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    R.run(cfg(tiny_llama, out, expansion="4", tensorboard=True), log=lambda s: None)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("L1R-4x/loss")] == [2, 4, 6, 8]
    assert "L1R-4x/eval/explained_variance" in acc.Tags()["scalars"]


# ------------------------------------------------------------------------- missing packages, failures


@pytest.mark.parametrize("flag,modules,package", [
    ("wandb", ("wandb",), "wandb"),
    ("tensorboard", ("tensorboard", "torch.utils.tensorboard"), "tensorboard"),
])
def test_a_missing_package_is_one_line_naming_the_flag(flag, modules, package, monkeypatch):
    for mod in modules:
        monkeypatch.setitem(sys.modules, mod, None)  # ``import`` of it raises ModuleNotFoundError
    c = TrainConfig(**{flag: True})
    with pytest.raises(ValueError) as e:
        check_trackers(c)
    assert str(e.value) == f"--{flag}: needs the {package} package (pip install {package})"
    check_trackers(TrainConfig())  # neither flag: nothing imported, nothing checked


def test_a_missing_package_stops_the_run_before_the_model_loads(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)

    def load_model(*a, **k):
        raise AssertionError("the model loaded before the trackers' packages were checked "
                             "(trainer.run.setup must call trainer.track.check_trackers first)")

    monkeypatch.setattr(R, "load_model", load_model)
    argv = ["--model", tiny_llama, "--layer", "1", "--context-len", "64", "--tokens", "2048", "--batch-size", "256",
            "--buffer-tokens", "1024", "--no-progress", "--output", str(tmp_path / "out"), "--wandb"]
    assert R.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: --wandb: needs the wandb package (pip install wandb)", err


def test_a_run_that_cannot_start_is_one_line_and_a_failing_tracker_never_ends_training(tmp_path, monkeypatch):
    fake = types.ModuleType("wandb")
    fake.__version__ = "0.31.0"

    def init(**kw):
        raise RuntimeError("api_key not configured (no-tty)")

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with pytest.raises(ValueError, match=r"^--wandb: could not start a run \(RuntimeError: api_key not configured"):
        open_trackers(TrainConfig(wandb=True, output=str(tmp_path)), tmp_path, ["L1R-8x"], log=lambda s: None)

    class Broken:
        name = "wandb"
        closed = None

        def log(self, step, records):
            raise OSError("disk full")

        def close(self, failed=False):
            Broken.closed = failed

    class Fine:
        name = "tensorboard"

        def __init__(self):
            self.steps, self.closes = [], []

        def log(self, step, records):
            self.steps.append(step)

        def summary(self, results):
            pass

        def close(self, failed=False):
            self.closes.append(failed)

    said, fine = [], Fine()
    t = Trackers([Broken(), fine], log=said.append)
    t.log(2, {"L1R-8x": {"step": 2, "loss": 1.0}})
    t.log(4, {"L1R-8x": {"step": 4, "loss": 0.5}})
    assert fine.steps == [2, 4] and Broken.closed is True
    assert len(said) == 1 and said[0].startswith("--wandb: log failed (OSError: disk full)")
    t.close()
    t.close()  # idempotent
    assert fine.closes == [False]
    # closed while an exception propagates (a failed run): marked failed
    fine2 = Fine()
    t = Trackers([fine2])
    try:
        raise KeyError("boom")
    except KeyError:
        t.close()
    assert fine2.closes == [True]
