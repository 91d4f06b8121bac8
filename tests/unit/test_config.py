"""TrainConfig: validation in __post_init__, the two sets of defaults, resolution against a model."""
import dataclasses

import pytest

from trainer.config import EMBEDDED_DEFAULTS, RECIPE_DEFAULTS, TrainConfig


def test_defaults_are_valid_and_embedded():
    c = TrainConfig()
    assert c.is_embedded and c.model == "embedded" and c.dataset == "pydoc" and c.position == "R"
    r = c.resolve(30, 576, "cpu")
    for k, v in EMBEDDED_DEFAULTS.items():
        assert getattr(r, k) == v, k
    assert r.run_name() == "L12R-8x" and r.precision == "fp32"
    assert r.k_start == 288 and r.k_aux == 288
    assert r.warmup_steps == max(1, int(0.05 * r.total_steps))
    assert r.eval_lm_tokens == 4096
    assert r.dead_window_tokens == 16384  # 16 batches of 1024 (README, 'Dead latents')
    assert c.layer is None  # resolve returns a copy


def test_recipe_defaults_for_other_models():
    r = TrainConfig(model="org/model").resolve(32, 4096, "cuda")
    for k, v in RECIPE_DEFAULTS.items():
        assert getattr(r, k) == v, k
    assert r.layer == 16 and r.eval_lm_tokens == r.eval_tokens and r.precision == "bf16"


@pytest.mark.parametrize("tokens,batch,window", [(300_000, 1024, 16384), (2_000_000, 1024, 100_000),
                                                 (800_000_000, 4096, 10_000_000)])
def test_dead_window_default_is_16_batches_or_a_twentieth_of_the_run_capped_at_10m(tokens, batch, window):
    r = TrainConfig(model="org/model", tokens=tokens, batch_size=batch).resolve(32, 4096, "cuda")
    assert r.dead_window_tokens == window


def test_explicit_values_win():
    r = TrainConfig(model="org/model", layer=3, tokens=4096, batch_size=512, warmup_steps=0,
                    k_start=60, dead_window_tokens=100).resolve(8, 64, "cpu")
    assert (r.layer, r.total_steps, r.warmup_steps, r.k_start, r.dead_window_tokens) == (3, 8, 0, 60, 100)


@pytest.mark.parametrize("kw,flag", [
    (dict(position="Z"), "--position"),
    (dict(layer=-1), "--layer"),
    (dict(layer=True), "--layer"),
    (dict(expansion=0), "--expansion"),
    (dict(k=0), "--k"),
    (dict(tokens=0), "--tokens"),
    (dict(batch_size=-5), "--batch-size"),
    (dict(lr=0.0), "--lr"),
    (dict(lr=float("nan")), "--lr"),
    (dict(clip_grad_norm=-1.0), "--clip-grad-norm"),
    (dict(beta1=1.0), "--beta1"),
    (dict(decay_fraction=1.5), "--decay-fraction"),
    (dict(loss="mse"), "--loss"),
    (dict(precision="fp8"), "--precision"),
    (dict(export_dtype="int8"), "--export-dtype"),
    (dict(buffer_device="disk"), "--buffer-device"),
    (dict(context_len=1), "--context-len"),
    (dict(k=60, k_start=50), "--k-start"),
    (dict(resume=True, overwrite=True), "--resume"),
    (dict(seed="1"), "--seed"),
])
def test_validation_names_the_flag_and_expectation(kw, flag):
    with pytest.raises(ValueError, match=flag) as e:
        TrainConfig(**kw)
    assert "expected" in str(e.value)


@pytest.mark.parametrize("kw,n_layers,flag", [
    (dict(layer=30), 30, "--layer"),
    (dict(k=5000), 30, "--k"),
    (dict(tokens=100, batch_size=1024), 30, "--tokens"),
    (dict(buffer_tokens=1000), 30, "--buffer-tokens"),
])
def test_resolution_errors(kw, n_layers, flag):
    with pytest.raises(ValueError, match=flag):
        TrainConfig(**kw).resolve(n_layers, 576, "cpu")


def test_dict_round_trip():
    c = TrainConfig(layer=4, position="TC", auxk=True)
    assert TrainConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({**c.to_dict(), "bogus": 1})
    assert all(f.metadata.get("help") for f in dataclasses.fields(TrainConfig))


def test_each_member_of_a_suite_clamps_k_start_and_k_aux_to_its_own_width():
    """--expansion 1,8 (d_model 64: widths 64 and 512). The suite's resolve leaves the clamps to each member
    (``solo``), and each member's step (StepConfig.from_train_config(cfg.solo(m, d_model)), as
    trainer.members builds it) gets k_start and k_aux at most its own d_sae: values over the narrow
    width are clamped there and kept by the wide member; the defaults (d_model / 2) fit both."""
    from trainer.train import StepConfig

    def per_member(**kw):
        cfg = TrainConfig(model="org/model", expansion="1,8", k=8, **kw).resolve(4, 64, "cpu")
        out = {}
        for m in cfg.members():
            sc = StepConfig.from_train_config(cfg.solo(m, 64))
            out[m.expansion] = (sc.k_start, sc.k_aux)
        return out

    assert per_member() == {1: (32, 32), 8: (32, 32)}  # the defaults: d_model / 2 for both
    got = per_member(k_start=100, k_aux=200)
    assert got[1] == (64, 64), f"the 64-latent member: (k_start, k_aux) = {got[1]}, expected both clamped to 64"
    assert got[8] == (100, 200), f"the 512-latent member: (k_start, k_aux) = {got[8]}, expected (100, 200) kept"
    single = TrainConfig(model="org/model", expansion=1, k=8, k_start=100, k_aux=200).resolve(4, 64, "cpu")
    assert (single.k_start, single.k_aux) == (64, 64)  # one SAE: resolve clamps them itself


def test_k_sweep_members_names_and_refusals():
    from trainer.config import TrainConfig

    c = TrainConfig(hookpoints="L1R,L2M", expansion="2,4", k="16,4")
    assert c.ks == [16, 4] and c.k_swept
    names = [m.name for m in c.members()]
    assert names == ["L1R-2x-k4", "L1R-2x-k16", "L1R-4x-k4", "L1R-4x-k16",
                     "L2M-2x-k4", "L2M-2x-k16", "L2M-4x-k4", "L2M-4x-k16"]
    assert TrainConfig(k="50").k == 50 and not TrainConfig(k=50).k_swept
    assert [m.name for m in TrainConfig(layer=3, k=50).members()] == ["L3R-8x"]  # nothing swept: today's names
    for bad, match in (("4,4", "--k"), ("", "--k"), ("4,x", "--k"), ("0", "--k"), ([], "--k")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(k=bad)
    with pytest.raises(ValueError, match="--k-start"):
        TrainConfig(k="4,64", k_start=32)
    # K above a member's width, named with the member (d_model 8: 2x is 16 latents)
    with pytest.raises(ValueError, match=r"--k: expected at most d_sae = 16 \(L1R-2x-k32\), got 32"):
        TrainConfig(hookpoints="L1R", expansion="2,8", k="4,32").resolve(4, 8, "cpu")
    r = TrainConfig(hookpoints="L1R", expansion=8, k="4,40").resolve(4, 8, "cpu")
    solo = {m.name: r.solo(m, 8) for m in r.members()}
    assert (solo["L1R-8x-k4"].k, solo["L1R-8x-k4"].k_start) == (4, 4)  # max(K, d_model / 2), as alone
    assert (solo["L1R-8x-k40"].k, solo["L1R-8x-k40"].k_start) == (40, 40)
