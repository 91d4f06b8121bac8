"""Interop with the real peer packages, where installed: SAELens 6 (every architecture it writes that a
TopKSAE can hold, both directions), EleutherAI sparsify (both directions, read by its own loader) and
SAEBench (the adapter against its own checks, config class and reference SAE classes).

Each package is imported once per module through a fixture (SAELens's import alone takes ~10 s on
two cores); a test skips when its package is absent. CI installs them (see README, "Run the tests").
"""
import copy
import dataclasses
import os

import pytest
import torch

from helpers import assert_close
from sae_kernels import SAEConfig, TopKSAE

if not torch.cuda.is_available():
    # sparsify decodes with Triton unless told otherwise, which fails without a GPU; read at its import.
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

D, N, K = 24, 80, 6
HEADS, D_HEAD = 4, 6  # hook_z: D = HEADS * D_HEAD


@pytest.fixture(scope="module")
def sl():
    return pytest.importorskip("sae_lens")


@pytest.fixture(scope="module")
def sparsify():
    return pytest.importorskip("sparsify")


@pytest.fixture(scope="module")
def sae_bench():
    pytest.importorskip("sae_lens")  # sae_bench's modules import SAELens and TransformerLens
    base = pytest.importorskip("sae_bench.custom_saes.base_sae")
    return base


def _randomise(module, seed):
    """Every parameter random, decoder rows of very different norms, thresholds positive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3).to(p.dtype))
        module.W_dec.mul_((0.2 + 2 * torch.rand(module.W_dec.shape[0], 1, generator=g, dtype=torch.float64)).to(module.W_dec.dtype))
        if isinstance(getattr(module, "threshold", None), torch.Tensor):
            module.threshold.copy_(torch.rand(module.threshold.shape, generator=g, dtype=torch.float64) * 0.3)
    return module


def _saelens_cases(sl):
    from sae_lens.saes.sae import SAEMetadata

    def meta(hook="blocks.3.hook_resid_post", **kw):
        return SAEMetadata(model_name="gpt2", hook_name=hook, **kw)

    common = dict(d_in=D, d_sae=N, dtype="float64")
    return {
        # name: (module, is a training SAE, input shape)
        "standard": (sl.StandardSAE(sl.StandardSAEConfig(**common, metadata=meta())), False),
        "jumprelu": (sl.JumpReLUSAE(sl.JumpReLUSAEConfig(**common, apply_b_dec_to_input=False, metadata=meta())), False),
        "gated": (sl.GatedSAE(sl.GatedSAEConfig(**common, metadata=meta())), False),
        "topk": (sl.TopKSAE(sl.TopKSAEConfig(**common, k=K, metadata=meta())), False),
        "topk_rescale": (sl.TopKSAE(sl.TopKSAEConfig(**common, k=K, rescale_acts_by_decoder_norm=True, metadata=meta())), False),
        "topk_training": (sl.TopKTrainingSAE(sl.TopKTrainingSAEConfig(**common, k=K, metadata=meta())), True),
        "jumprelu_training": (sl.JumpReLUTrainingSAE(sl.JumpReLUTrainingSAEConfig(**common, metadata=meta())), True),
        "batchtopk_training": (sl.BatchTopKTrainingSAE(sl.BatchTopKTrainingSAEConfig(**common, k=K, metadata=meta())), True),
        "matryoshka_training": (sl.MatryoshkaBatchTopKTrainingSAE(sl.MatryoshkaBatchTopKTrainingSAEConfig(
            **common, k=K, matryoshka_widths=[N // 4, N], metadata=meta())), True),
        "transcoder": (sl.Transcoder(sl.TranscoderConfig(**common, d_out=D, apply_b_dec_to_input=False,
                                                         metadata=meta("blocks.3.ln2.hook_normalized", hook_name_out="blocks.3.hook_mlp_out"))), False),
        "jumprelu_transcoder": (sl.JumpReLUTranscoder(sl.JumpReLUTranscoderConfig(
            **common, d_out=D, apply_b_dec_to_input=False,
            metadata=meta("blocks.3.ln2.hook_normalized", hook_name_out="blocks.3.hook_mlp_out"))), False),
        "hook_z": (sl.StandardSAE(sl.StandardSAEConfig(**common, reshape_activations="hook_z",
                                                       metadata=meta("blocks.3.attn.hook_z"))), False),
    }


CASES = ["standard", "jumprelu", "gated", "topk", "topk_rescale", "topk_training", "jumprelu_training",
         "batchtopk_training", "matryoshka_training", "transcoder", "jumprelu_transcoder", "hook_z"]


@pytest.mark.parametrize("case", CASES)
def test_saelens_round_trip(sl, tmp_path, case):
    """SAELens writes, we read: same latents and reconstruction as SAELens's module. We write, SAELens's
    own loader reads: the same again, and the provenance (model, hook, hook_z) survives."""
    module, training = _saelens_cases(sl)[case]
    module = _randomise(module, seed=CASES.index(case))
    if case.startswith("batchtopk") or case.startswith("matryoshka"):
        module.topk_threshold = torch.tensor(0.25, dtype=torch.float64)
    module.save_model(tmp_path / "theirs")  # a training SAE writes its training checkpoint
    if training:
        # What SAELens itself runs at inference: its exported inference model, read back by its loader
        # (a BatchTopK training SAE's own encode is a batch-level TopK; it exports as JumpReLU).
        module.save_inference_model(tmp_path / "inference")
        ref = sl.SAE.load_from_disk(tmp_path / "inference", dtype="float64")
    else:
        ref = module
    x_shape = (50, HEADS, D_HEAD) if case == "hook_z" else (200, D)
    x = torch.randn(*x_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1.5
    with torch.no_grad():
        want_f, want_x = ref.encode(x), ref.decode(ref.encode(x))
    l0 = (want_f > 0).sum(-1).double().mean()
    assert 1 <= l0 < 0.8 * N, f"test input should give a sparse code, L0 {float(l0)}"

    ours = TopKSAE.from_saelens(tmp_path / "theirs")
    assert ours.dtype == torch.float64
    assert ours.cfg.model_name == "gpt2" and ours.cfg.layer == 3
    assert_close(ours.encode(x), want_f, 1e-10, f"{case}: latents")
    assert_close(ours(x), want_x, 1e-10, f"{case}: reconstruction")
    if ours.cfg.activation == "jumprelu" and bool((ours.threshold != 0).any()):  # thresholds matter here
        relu = copy.deepcopy(ours)
        relu.threshold.zero_()
        assert int((relu.encode(x) > 0).sum()) > int((ours.encode(x) > 0).sum()) + 50

    ours.to_saelens(tmp_path / "ours")
    back = sl.SAE.load_from_disk(tmp_path / "ours")
    assert back.dtype == torch.float64
    md = back.cfg.metadata
    assert md.model_name == "gpt2" and md.hook_name == module.cfg.metadata.hook_name and md.hook_layer == 3
    if "transcoder" in case:
        assert md.hook_name_out == "blocks.3.hook_mlp_out"
    assert back.cfg.reshape_activations == module.cfg.reshape_activations
    with torch.no_grad():
        assert_close(back.encode(x), want_f, 1e-10, f"{case}: SAELens reading our folder, latents")
        assert_close(back.decode(back.encode(x)), want_x, 1e-10, f"{case}: SAELens reading our folder")


def test_saelens_reads_our_llama_scope_style_sae(sl, tmp_path):
    """A trained-state SAE (dataset norms, weighted TopK, unequal decoder rows) exported to SAELens."""
    torch.manual_seed(0)
    for act in ("topk", "jumprelu"):
        sae = TopKSAE(SAEConfig(d_model=D, d_sae=N, k=K, norm_in=0.4, norm_out=2.5, dtype="float64",
                                activation=act, model_name="m", hook_point_in="blocks.1.hook_resid_post",
                                hook_point_out="blocks.1.hook_resid_post"))
        with torch.no_grad():
            sae.W_dec.mul_(torch.rand(N, 1, dtype=torch.float64) * 2 + 0.2)
            sae.b_enc.normal_(0, 0.3)
            sae.b_dec.normal_()
            sae.threshold.fill_(0.6)
        sae.to_saelens(tmp_path / act)
        theirs = sl.SAE.load_from_disk(tmp_path / act)
        x = torch.randn(100, D, dtype=torch.float64) * 3
        with torch.no_grad():
            assert_close(theirs(x), sae(x), 1e-10, act)
            assert_close(theirs.encode(x), sae.folded().encode(x), 1e-10, act)


def test_saelens_refused_architectures(sl, tmp_path):
    from sae_lens.saes.sae import SAEMetadata

    m = SAEMetadata(model_name="gpt2", hook_name="blocks.0.hook_resid_post")
    sl.AbsTopKSAE(sl.AbsTopKSAEConfig(d_in=D, d_sae=N, k=K, metadata=m)).save_model(tmp_path / "abs")
    with pytest.raises(ValueError, match="architecture 'abstopk' cannot be loaded"):
        TopKSAE.from_saelens(tmp_path / "abs")
    sl.SkipTranscoder(sl.SkipTranscoderConfig(d_in=D, d_sae=N, d_out=D, apply_b_dec_to_input=False,
                                              metadata=m)).save_model(tmp_path / "skip")
    with pytest.raises(ValueError, match="architecture 'skip_transcoder' cannot be loaded.*W_skip"):
        TopKSAE.from_saelens(tmp_path / "skip")
    sl.Transcoder(sl.TranscoderConfig(d_in=D, d_sae=N, d_out=D + 1, apply_b_dec_to_input=False,
                                      metadata=m)).save_model(tmp_path / "wide")
    with pytest.raises(ValueError, match=r"d_out=25 != d_in=24"):
        TopKSAE.from_saelens(tmp_path / "wide")


# ------------------------------------------------------------------------------ sparsify


@pytest.mark.parametrize("transcode", [False, True])
def test_sparsify_round_trip(sparsify, tmp_path, transcode):
    cfg = sparsify.SparseCoderConfig(k=K, num_latents=N, transcode=transcode)
    theirs = _randomise(sparsify.SparseCoder(D, cfg, dtype=torch.float64), seed=11)
    theirs.save_to_disk(tmp_path / "theirs")
    x = torch.randn(150, D, dtype=torch.float64)
    with torch.no_grad():
        acts, idx, _ = theirs.encode(x)
        want_x = theirs.decode(acts, idx)
        want_f = torch.zeros(150, N, dtype=torch.float64).scatter(-1, idx, acts)
    ours = TopKSAE.from_sparsify(tmp_path / "theirs")
    assert ours.dtype == torch.float64
    assert_close(ours.encode(x), want_f, 1e-10, "latents")
    assert_close(ours(x), want_x, 1e-10, "reconstruction")
    if transcode:
        ours.cfg = ours.cfg.replace(hook_point_in="blocks.2.ln2.hook_normalized", hook_point_out="blocks.2.hook_mlp_out")
    ours.to_sparsify(tmp_path / "ours")
    back = sparsify.SparseCoder.load_from_disk(tmp_path / "ours")
    assert back.cfg.transcode == transcode and back.cfg.k == K and back.num_latents == N
    with torch.no_grad():
        acts2, idx2, _ = back.encode(x)
        assert_close(back.decode(acts2, idx2), want_x, 1e-10, "sparsify reading our folder")
    assert_close(TopKSAE.from_sparsify(tmp_path / "ours")(x), want_x, 1e-10, "our round trip")


def test_sparsify_reads_a_weighted_topk_sae(sparsify, tmp_path):
    torch.manual_seed(2)
    sae = TopKSAE(SAEConfig(d_model=D, d_sae=N, k=K, norm_in=0.5, norm_out=1.7))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(N, 1) * 2 + 0.2)
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_()
    sae.to_sparsify(tmp_path / "sp")
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "sp")
    assert theirs.dtype == torch.float32 and theirs.cfg.normalize_decoder
    x = torch.randn(100, D) * 3
    with torch.no_grad():
        acts, idx, _ = theirs.encode(x)
        assert_close(theirs.decode(acts, idx), sae(x), 1e-4, "sparsify forward of a weighted TopK SAE")


# ------------------------------------------------------------------------------ SAEBench


def _weighted_sae(activation="topk", hook="blocks.1.hook_resid_post", dtype="float64", **kw):
    torch.manual_seed(4)
    sae = TopKSAE(SAEConfig(d_model=D, d_sae=N, k=K, norm_in=0.6, norm_out=1.3, dtype=dtype, activation=activation,
                            model_name="tiny-llama", hook_point_in=hook, hook_point_out=hook, **kw))
    with torch.no_grad():
        sae.W_dec.mul_((torch.rand(N, 1) * 2 + 0.2).to(sae.dtype))
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_()
        sae.threshold.fill_(0.5)
    return sae


def test_saebench_contract_with_its_own_checks(sae_bench):
    from sae_bench.custom_saes.custom_sae_config import CustomSAEConfig
    from sae_bench.sae_bench_utils import general_utils

    from sae_kernels.saebench import SAEBenchConfig

    # the copy used without sae_bench has exactly the real class's fields
    assert [f.name for f in dataclasses.fields(CustomSAEConfig)] == \
        [f.name for f in dataclasses.fields(SAEBenchConfig)][: len(dataclasses.fields(CustomSAEConfig))]
    for act in ("topk", "jumprelu"):
        a = _weighted_sae(act).to_saebench()
        assert isinstance(a.cfg, CustomSAEConfig)
        assert sae_bench.BaseSAE.check_decoder_norms(a)
        assert general_utils.check_decoder_norms(a.W_dec.data)
        sae_id, same, sparsity = general_utils.load_and_format_sae("custom", a, "cpu")  # its standardisation
        assert sae_id == "custom_sae" and same is a and sparsity is None
        assert a.cfg.architecture_str == act and a.cfg.hook_layer == 1 and a.cfg.metadata.model_name == "tiny-llama"
        assert a.cfg.to_dict()["d_in"] == D


def test_saebench_adapter_matches_its_reference_classes(sae_bench):
    """Loaded into SAEBench's own TopKSAE / JumpReluSAE, the adapter's tensors give the same latents."""
    from sae_bench.custom_saes.jumprelu_sae import JumpReluSAE
    from sae_bench.custom_saes.topk_sae import TopKSAE as BenchTopK

    x = torch.randn(3, 20, D, dtype=torch.float64) * 2
    a = _weighted_sae("topk").to_saebench()
    ref = BenchTopK(D, N, K, "tiny-llama", 1, torch.device("cpu"), torch.float64)
    with torch.no_grad():  # its encode subtracts b_dec first: shift b_enc to match
        ref.load_state_dict({"W_enc": a.W_enc, "b_enc": a.b_enc + a.b_dec @ a.W_enc, "W_dec": a.W_dec,
                             "b_dec": a.b_dec, "k": torch.tensor(K, dtype=torch.int)})
        assert_close(a.encode(x), ref.encode(x), 1e-10, "topk latents")
        assert_close(a(x), ref(x), 1e-10, "topk forward")
    j = _weighted_sae("jumprelu").to_saebench()
    refj = JumpReluSAE(D, N, "tiny-llama", 1, torch.device("cpu"), torch.float64)
    with torch.no_grad():
        refj.load_state_dict({"W_enc": j.W_enc, "b_enc": j.b_enc, "W_dec": j.W_dec, "b_dec": j.b_dec,
                              "threshold": j.threshold})
        assert_close(j.encode(x), refj.encode(x), 1e-10, "jumprelu latents")
        assert_close(j(x), refj(x), 1e-10, "jumprelu forward")


def test_saebench_weight_metrics_and_test_sae(sae_bench, tmp_path, monkeypatch):
    """SAEBench's core weight metrics, and BaseSAE.test_sae on a tiny random TransformerLens model
    (test_sae loads the model by name; here from_pretrained returns the tiny one)."""
    core = pytest.importorskip("sae_bench.evals.core.main")  # needs tabulate (in the test extra)
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    a = _weighted_sae("topk", dtype="float32").to_saebench()
    m = core.get_featurewise_weight_based_metrics(a)
    assert len(m["encoder_norm"]) == N and len(m["encoder_decoder_cosine_sim"]) == N

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<bos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer, tok.decoder = ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<bos>",
                            pad_token="<bos>").save_pretrained(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), add_bos_token=True)
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning):
        model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=D, n_ctx=256, d_head=6, n_heads=4,
                                                          d_mlp=48, d_vocab=len(vocab), act_fn="relu"),
                                  tokenizer=tokenizer)

    class Loader:
        @staticmethod
        def from_pretrained(name, device=None, **kw):
            assert name == "tiny-llama"
            return model

    monkeypatch.setattr(sae_bench, "HookedTransformer", Loader)
    sae_bench.BaseSAE.test_sae(a, "tiny-llama")  # its asserts: shapes, forward == decode(encode)


def test_saebench_hook_z_switch(sae_bench):
    a = _weighted_sae("topk", hook="blocks.1.attn.hook_z", reshape_activations="hook_z").to_saebench()
    x = torch.randn(5, 7, HEADS, D_HEAD, dtype=torch.float64)
    assert a.hook_z_reshaping_mode and a(x).shape == x.shape
    a.turn_off_forward_pass_hook_z_reshaping()  # what SAEBench's core evaluation does on hook_z
    flat = x.flatten(-2)
    assert a(flat).shape == flat.shape
    assert_close(a(flat), a.decode(a.encode(flat)), 0, "flat")


def test_a_runs_saelens_export_loads_with_saelens_and_names_a_loadable_model(sl, tiny_llama, tmp_path):
    """Issue 30.5: the model name a run writes (lm_config.json, then SAELens's cfg.json and the SAEBench
    adapter's default) is what loads the model: the path given for a local folder (here a tiny run),
    the Hub id for the embedded default, never a description."""
    import json

    from trainer.data.lm import LoadedModel, load_model, model_identity
    from trainer.run import main

    out = tmp_path / "run"
    assert main(["--model", tiny_llama, "--layer", "1", "--context-len", "64", "--lm-batch-size", "4",
                 "--tokens", "1024", "--batch-size", "256", "--buffer-tokens", "1024", "--eval-tokens", "128",
                 "--no-progress", "--no-eval-lm-loss", "--output", str(out)]) == 0
    run_dir = out / "L1R-8x"
    lm_cfg = json.loads((run_dir / "lm_config.json").read_text())
    assert lm_cfg["model_name"] == tiny_llama and load_model(lm_cfg["model_name"]).d_model == lm_cfg["d_model"]
    sae = TopKSAE.from_llama_scope(run_dir)
    sae.to_saelens(tmp_path / "saelens")
    theirs = sl.SAE.load_from_disk(tmp_path / "saelens")
    assert theirs.cfg.metadata.model_name == tiny_llama and theirs.cfg.metadata.hook_layer == 1
    assert sae.to_saebench().cfg.model_name == tiny_llama
    x = torch.randn(16, sae.d_model)
    with torch.no_grad():
        assert_close(theirs(x), sae(x), 1e-5, "SAELens reading a run's export")

    # The embedded default, without loading its 135M weights: the lm_config its run writes, then the
    # same exports.
    ident = model_identity("embedded")
    lm = LoadedModel(model=torch.nn.Linear(1, 1), tokenizer=None, name=ident.name, n_layers=30, d_model=sae.d_model,
                     is_embedded=True, source=ident.source, file=ident.file)
    sae.to_llama_scope(tmp_path / "embedded", lm_config=lm.lm_config())
    emb = TopKSAE.from_llama_scope(tmp_path / "embedded")
    assert emb.cfg.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    emb.to_saelens(tmp_path / "embedded_saelens")
    cfg = json.loads((tmp_path / "embedded_saelens" / "cfg.json").read_text())
    assert cfg["model_name"] == cfg["metadata"]["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert sl.SAE.load_from_disk(tmp_path / "embedded_saelens").cfg.metadata.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert emb.to_saebench().cfg.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
