"""Errors before the model loads (issue 14, item 14): missing local paths are missing-file errors (no Hub
lookup), an unreachable Hub fails a misspelt name without network retries, SAEs and buffers that cannot
fit are refused with their size, and bad k / token counts name their flag. The model is never loaded."""
import socket

import pytest

import trainer.preflight as P
import trainer.run as R
from trainer.preflight import hub_reachable, sae_bytes
from trainer.run import main


@pytest.fixture(scope="module")
def tiny(tiny_llama, tmp_path_factory):
    return tiny_llama, tmp_path_factory.mktemp("preflight")


@pytest.fixture
def no_model_load(monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(R, "load_model", no_load)


@pytest.fixture
def no_hub(monkeypatch):
    """No Hub lookups: loading ``datasets.load_dataset`` for a Hub name fails the test."""
    import datasets

    def hub(name, *a, **k):
        if a or k.get("data_files") is None:
            raise AssertionError(f"a Hub lookup of {name!r}")
        return real(name, *a, **k)

    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", hub)


def small(model, out, *extra):
    return ["--model", model, "--layer", "1", "--context-len", "64", "--tokens", "4096", "--batch-size", "256",
            "--buffer-tokens", "1024", "--no-progress", "--output", str(out), *extra]


def last_error(capsys):
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("dataset", ["missing.jsonl", "./missing", "data/sub/missing"])
def test_a_missing_relative_dataset_is_a_missing_file_error(tiny, tmp_path, monkeypatch, dataset, capsys,
                                                            no_model_load, no_hub):
    monkeypatch.chdir(tmp_path)
    assert main(small(tiny[0], tmp_path / "o", "--dataset", dataset)) == 2
    err = last_error(capsys)
    assert err.startswith(f"error: --dataset {dataset!r}: no such file or folder ({tmp_path}/"), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("model", ["./missing", "missing/model/folder", "nothere.gguf"])
def test_a_missing_relative_model_is_a_missing_file_error(tmp_path, monkeypatch, model, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(P, "hub_reachable", lambda *a, **k: pytest.fail("a Hub lookup for a local path"))
    assert main(["--model", model, "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    assert last_error(capsys).startswith(f"error: --model {model!r}: no such file or folder ({tmp_path}/")


def test_an_unreachable_hub_fails_a_misspelt_name_without_network_retries(tmp_path, monkeypatch, capsys):
    """With the Hub unreachable, the name is looked up in the local cache only: no connection is tried
    (huggingface_hub would retry for ~30-50 s), transformers' config loader is not even reached (its
    import alone takes seconds), and the error names --model and says why."""
    import transformers

    monkeypatch.setattr(P, "hub_reachable", lambda *a, **k: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # an empty cache, whatever this machine has

    def no_network(*a, **k):
        raise AssertionError("a network connection was attempted")

    def no_config(*a, **k):
        raise AssertionError("AutoConfig was asked: the local cache should have answered")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_config)
    assert main(["--model", "HuggingFaceTB/SmolLM2-135M-Instruc", "--output", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot be reached" in err
    assert err.strip().splitlines()[-1] == (
        "error: --model 'HuggingFaceTB/SmolLM2-135M-Instruc': not in the local Hugging Face cache, and the Hub is "
        "offline (it cannot be reached, or HF_HUB_OFFLINE is set): check the name, or download the model where "
        "the Hub can be reached")
    assert not (tmp_path / "o").exists()
    assert hc.HF_HUB_OFFLINE is False  # the run's offline mode is undone when it ends


def test_offline_a_cached_hub_model_is_still_found(tmp_path, monkeypatch):
    """The offline cache check refuses only what the cache lacks: a cached model goes on to its config."""
    import huggingface_hub.constants as hc
    import transformers

    from trainer.data.lm import ModelError, model_facts

    snap = tmp_path / "models--org--cached" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text('{"num_hidden_layers": 3, "hidden_size": 32}')
    (tmp_path / "models--org--cached" / "refs").mkdir()
    (tmp_path / "models--org--cached" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    class Cfg:
        def to_dict(self):
            return {"num_hidden_layers": 3, "hidden_size": 32}

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda name, *a, **k: Cfg())
    assert model_facts("org/cached") == (3, 32)
    with pytest.raises(ModelError, match="'org/cachd': not in the local Hugging Face cache"):
        model_facts("org/cachd")


def test_hub_reachable_is_false_for_a_closed_port(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the socket is
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert hub_reachable(timeout_s=2.0) is False


def test_saes_that_cannot_fit_are_refused_before_the_model_loads(tiny, tmp_path, capsys, no_model_load):
    """d_sae = 10^7 x 32: 20.8G parameters x 16 bytes, 310 GiB of weights, gradients and Adam state."""
    assert main(small(tiny[0], tmp_path / "o", "--expansion", "10000000")) == 2
    err = last_error(capsys)
    assert err.startswith("error: --expansion: the SAE of this rank needs 920.30 GiB") and "GiB" in err and "--tp" in err, err
    assert "20,800.0M parameters x 16 bytes for weights, gradients and Adam moments: 309.94 GiB" in err
    assert not (tmp_path / "o").exists()


def test_sae_memory_estimate_follows_the_placement():
    """Four 8x members on 2 model groups of tp 2: each rank holds two members' halves."""
    one = sae_bytes([8], 64, rank=0, tp=1, dp=1, batch_size=256, bf16=False)
    p = 2 * 64 * 512 + 512 + 64
    assert one["params"] == p and one["state"] == 16 * p and one["activations"] == 256 * 512 * 8
    four = sae_bytes([8, 8, 8, 8], 64, rank=3, tp=2, dp=2, batch_size=256, bf16=True)
    assert four["members"] == 2 and four["params"] == 2 * (2 * 64 * 256 + 256 + 64)
    assert four["state"] == 20 * four["params"]


@pytest.mark.parametrize("extra,flag", [
    (["--k", "300"], "--k: expected at most d_sae = 256"),
    (["--tokens", "100"], "--tokens: expected at least one batch"),
    (["--buffer-tokens", "300"], "--buffer-tokens: expected at least 2 x --batch-size"),
    (["--layer", "7"], "--layer: expected 0 <= layer < 3"),
])
def test_bad_counts_are_refused_before_the_model_loads(tiny, tmp_path, extra, flag, capsys, no_model_load):
    assert main(small(tiny[0], tmp_path / "o") + extra) == 2
    assert last_error(capsys).startswith("error: " + flag)


def test_sigterm_before_the_training_loop_ends_in_one_line(tiny, tmp_path, monkeypatch, capsys):
    """SIGTERM while the model loads (outside the loop's own handler): exit status 143, one line, no
    traceback, the run folder's lock released."""
    import os
    import signal

    from trainer.run_folder import LOCK_NAME

    def terminated_while_loading(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM was not handled")

    monkeypatch.setattr(R, "load_model", terminated_while_loading)
    before = signal.getsignal(signal.SIGTERM)
    assert main(small(tiny[0], tmp_path / "o")) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("stopped by SIGTERM outside the training loop (loading, evaluation or export); run the "
                       "command again, with --resume if the run wrote a checkpoint"), err[-3:]
    assert not any("Traceback" in ln for ln in err)
    assert signal.getsignal(signal.SIGTERM) == before
    assert not (tmp_path / "o" / LOCK_NAME).exists()


def test_a_buffer_that_cannot_fit_is_refused_before_the_model_loads(tiny, tmp_path, monkeypatch, capsys, no_model_load):
    """2^24 tokens x 1 hook point x d_model 32 x 4 bytes = 2 GiB of buffer against 1 GiB free (faked)."""
    monkeypatch.setattr(P, "available_bytes", lambda device: 2**30)
    assert main(small(tiny[0], tmp_path / "o", "--buffer-tokens", str(2**24))) == 2
    assert last_error(capsys).startswith(
        "error: --buffer-tokens: the activation buffer needs 2.00 GiB on this rank (16,777,216 tokens x 1 hook point "
        "column blocks x d_model 32 x 4 bytes), more than the 1.00 GiB free on cpu")
    assert not (tmp_path / "o").exists()
