"""Evaluation metrics, the LM-loss splice, and every position trained + evaluated end to end."""
import json
import math

import pytest
import torch

from helpers import assert_close
from sae_kernels import SAEConfig, TopKSAE
from trainer.config import TrainConfig
from trainer.data import ContextData, load_documents
from trainer.evaluate import collect, sae_metrics
from trainer.data.lm import load_model
from trainer.run import run


@pytest.fixture(scope="module")
def tiny(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    path = tiny_llama
    return path, load_model(path), root


class Identity(torch.nn.Module):
    def forward(self, x):
        return x


def test_identity_splice_gives_zero_delta_and_full_ce_score(tiny):
    _, lm, _ = tiny
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = lm.tokenizer.bos_token_id
    for position in ("R", "M"):
        got = collect(lm, ids, 1, position, special_ids=lm.special_ids, saes={"id": Identity()}, batch_size=2)
        assert got["ce_id"] == pytest.approx(got["ce_clean"], abs=1e-6)
        assert got["ce_zero"] != pytest.approx(got["ce_clean"], abs=1e-4)
        assert got["ce_tokens"] == 3 * 39 and got["x"].shape == (3 * 39, 32)


@pytest.mark.parametrize("position", ["R", "A", "M", "TC"])
def test_every_position_trains_evaluates_and_reloads(tiny, position):
    path, lm, root = tiny
    out = root / f"runs{position}"
    cfg = TrainConfig(model=path, layer=1, position=position, context_len=64, lm_batch_size=4, tokens=8192,
                      batch_size=256, buffer_tokens=1024, eval_tokens=512, eval_every=5, progress=False,
                      output=str(out), jumprelu=position == "R", jumprelu_tokens=2048, lr=4e-3)
    res = run(cfg, log=lambda s: None)
    run_dir = out / f"L1{position}-8x"
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved["l0"] == 50 and saved["k"] == 50
    assert saved["explained_variance"] > 0.3, saved["explained_variance"]
    for key in ("delta_lm_loss", "ce_score", "ce_clean", "ce_sae", "ce_zero_ablation", "explained_variance_per_token"):
        assert math.isfinite(saved[key]), key
    for f in ("hyperparams.json", "lm_config.json", "checkpoints/final.safetensors", "metrics.jsonl", "train_config.json"):
        assert (run_dir / f).is_file(), f
    hp = json.loads((run_dir / "hyperparams.json").read_text())
    want_in = {"R": "blocks.1.hook_resid_post", "A": "blocks.1.hook_attn_out", "M": "blocks.1.hook_mlp_out",
               "TC": "blocks.1.ln2.hook_normalized"}[position]
    assert hp["hook_point_in"] == want_in and hp["d_sae"] == 256 and hp["act_fn"] == "topk"
    assert hp["hook_point_out"] == ("blocks.1.hook_mlp_out" if position == "TC" else want_in)
    # a user reloading the checkpoint reproduces the reported metrics on the held-out split
    sae = TopKSAE.from_llama_scope(run_dir)
    data = ContextData(load_documents(), lm.tokenizer, 64, 4, eval_every=5, eval_contexts=8, seed=42)
    got = collect(lm, data.eval, 1, position, special_ids=sorted(set(lm.special_ids)), lm_loss=False)
    again = sae_metrics(sae, got["x"], got["y"])
    assert again["n_tokens"] == saved["n_tokens"]
    for key in ("explained_variance", "explained_variance_per_token", "l0"):
        assert again[key] == pytest.approx(saved[key], abs=1e-6), key
    # ... and the formulas, in float64 from the reloaded SAE's output (a transcoder's target y: EV is centred
    # on mean(y), not on the inputs' mean)
    y = (got["x"] if got["y"] is None else got["y"]).double()
    with torch.no_grad():
        err = (y - sae(got["x"]).double()).pow(2).sum(-1)
    var = (y - y.mean(0)).pow(2).sum(-1)
    for key, want in (("explained_variance", 1 - err.sum() / var.sum()),
                      ("explained_variance_per_token", (1 - err / var).mean())):
        assert_close(torch.tensor(saved[key], dtype=torch.float64), want, atol=1e-6, what=f"{key} formula")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rec = json.loads(lines[-1])
    assert {"step", "tokens", "loss", "explained_variance", "l0", "k", "lr", "tokens_per_s"} <= set(rec)
    assert rec["step"] == 32 and rec["k"] == 50
    if position == "R":
        jr = saved["jumprelu"]
        jsae = TopKSAE.from_llama_scope(run_dir / "jumprelu")
        hj = json.loads((run_dir / "jumprelu" / "hyperparams.json").read_text())
        assert hj["act_fn"] == "jumprelu" and hj["jump_relu_threshold"] > 0
        assert jsae.cfg.activation == "jumprelu"
        assert 20 < jr["l0"] < 100 and math.isfinite(jr["delta_lm_loss"])


def test_evaluate_reports_delta_lm_loss_and_ce_score_by_their_formulas(tiny):
    """ce_clean / ce_sae / ce_zero_ablation recomputed with the Hugging Face model's own loss (labels,
    special targets ignored), then delta_lm_loss = ce_sae - ce_clean and
    ce_score = (ce_zero - ce_sae) / (ce_zero - ce_clean) checked on evaluate_sites()'s output."""
    from trainer.evaluate import evaluate_sites
    from trainer.data.lm import splice_sae, zero_ablate

    lm = load_model(tiny[0])
    with torch.no_grad():
        lm.model.lm_head.weight.mul_(40)  # a random tiny LM barely reacts to its layers: make the logits sharp
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(32, 128, k=16))
    ids = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = lm.tokenizer.bos_token_id
    ids[1, 20] = lm.tokenizer.eos_token_id  # a special target inside a context
    labels = ids.clone()
    labels[torch.isin(ids, torch.tensor(lm.special_ids))] = -100

    def hf_loss():
        with torch.no_grad():
            return float(lm.model(input_ids=ids, labels=labels, use_cache=False).loss)

    clean = hf_loss()
    with splice_sae(lm.model, sae, 1, "R", lm.special_ids):
        with_sae = hf_loss()
    with zero_ablate(lm.model, 1, "R", lm.special_ids):
        zero = hf_loss()
    assert min(abs(with_sae - clean), abs(zero - with_sae), abs(zero - clean)) > 1e-3  # distinct, or nothing is shown
    m = evaluate_sites(lm, {(1, "R"): {"sae": sae}}, ids, special_ids=lm.special_ids, batch_size=3)[0]["sae"]
    assert m["ce_tokens"] == 4 * 47 - 1
    for key, want in (("ce_clean", clean), ("ce_sae", with_sae), ("ce_zero_ablation", zero)):
        assert m[key] == pytest.approx(want, rel=1e-5), key
    assert m["delta_lm_loss"] == pytest.approx(with_sae - clean, rel=1e-4, abs=1e-6)
    assert m["ce_score"] == pytest.approx((zero - with_sae) / (zero - clean), rel=1e-4)
