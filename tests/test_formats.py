"""Checkpoint formats: our own, the released Llama Scope layout, SAELens and sparsify."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from helpers import assert_close
from sae_kernels import SAEConfig, TopKSAE
from sae_kernels.formats import hook_points

D, N_LAT = 40, 96
MU_IN, MU_OUT = 10.8125, 3.25  # MU_IN is the real L15R-8x figure
THETA = 0.35546875  # the real L15R-8x jump_relu_threshold


def write_llama_scope(folder, act_fn="jumprelu", seed=0, top_k=6, drop_key=None, hp_drop=None):
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
    sae = TopKSAE(SAEConfig(d_model=D, d_sae=N_LAT, k=7, norm_in=0.37, norm_out=1.9,
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
