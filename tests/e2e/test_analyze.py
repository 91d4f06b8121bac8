"""trainer.analyze: the streaming selections against dense brute force, logit effects against float64,
the data files, and ``python -m trainer.analyze`` end to end on a suite."""
import json
import math

import pytest
import torch

from helpers import assert_close

from sae_kernels import SAEConfig, TopKSAE
from trainer.analyze.cli import main
from trainer.analyze.corpus import held_out_contexts
from trainer.analyze.export import CHUNK, FORMAT
from trainer.analyze.features import HIST_BINS, HIST_MIN_EXP, HIST_PER_OCTAVE, PassConfig, analysis_pass
from trainer.analyze.logits import logit_effects, unembedding
from trainer.analyze.runs import parse_hook_point, resolve_run
from trainer.analyze.stream import StreamingTopN
from trainer.data.lm import activations, load_model


def test_streaming_topn_with_ties_equals_sorting_everything():
    g = torch.Generator().manual_seed(0)
    d, n, W = 13, 5, 3
    top = StreamingTopN(d, n, W)
    events = []  # (lat, score, arrival)
    arrival = 0
    for batch in range(9):
        m = int(torch.randint(0, 60, (1,), generator=g))
        lat = torch.randint(0, d, (m,), generator=g)
        score = torch.randint(1, 6, (m,), generator=g).float() / 4  # few distinct values: many ties
        ctx = torch.arange(arrival, arrival + m)
        win = torch.rand(m, W, generator=g)
        top.push(lat, score, ctx, torch.zeros(m, dtype=torch.int64), score * 10, lambda s, w=win: w[s])
        events += [(int(lat[i]), float(score[i]), arrival + i, win[i]) for i in range(m)]
        arrival += m
    for l in range(d):
        mine = sorted([e for e in events if e[0] == l], key=lambda e: (-e[1], e[2]))[:n]
        got = top.ctx[l][top.ctx[l] >= 0].tolist()
        assert got == [e[2] for e in mine], (l, got, [e[2] for e in mine])
        for j, e in enumerate(mine):
            assert top.score[l, j] == e[1] and top.value[l, j] == e[1] * 10
            assert torch.equal(top.window[l, j], e[3])
        assert torch.isinf(top.score[l, len(mine):]).all()


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama):
    return load_model(tiny_llama)


def _random_sae(d, n, k, seed):
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(d, n, k=k, dtype="float64", norm_in=1.7, norm_out=1.3))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05)  # some latents never fire, others often
        sae.W_dec.mul_(torch.rand(n, 1, dtype=torch.float64) + 0.5)  # unequal norms: the weighted selection matters
    return sae


@pytest.mark.parametrize("position", ["R", "TC"])
def test_analysis_pass_equals_dense_brute_force(tiny_lm, position):
    lm = tiny_lm
    g = torch.Generator().manual_seed(1)
    B, T = 11, 40
    ctx = torch.randint(0, 256, (B, T), generator=g)
    ctx[:, 0] = lm.tokenizer.bos_token_id
    ctx[3, 17] = lm.tokenizer.eos_token_id  # a special token inside a context
    special = lm.special_ids
    saes = {"a": (_random_sae(32, 96, 5, 0), 1, position), "b": (_random_sae(32, 40, 3, 1), 2, "R")}
    cfg = PassConfig(top_n=4, samples=5, before=5, after=3, seed=3)
    stats, _ = analysis_pass(lm, saes, ctx, special, cfg, batch_size=3)
    for name, (sae, layer, pos) in saes.items():
        x, _, keep = activations(lm, ctx, layer, pos, special)
        dense = torch.zeros(B, T, sae.cfg.d_sae, dtype=torch.float64)
        with torch.no_grad():
            dense[keep] = sae.encode(x.double())
        dense = dense.float()
        st = stats[name]
        active = dense > 0
        assert torch.equal(st.count, active.sum((0, 1)))
        assert st.n_tokens == int(keep.sum())
        assert_close(st.sum, dense.double().sum((0, 1)), rtol=1e-6, atol=1e-9)
        v = dense[active]
        bins = ((torch.log2(v) - HIST_MIN_EXP) * HIST_PER_OCTAVE).floor().clamp(0, HIST_BINS - 1).long()
        lat = active.nonzero()[:, 2]
        want_hist = torch.bincount(lat * HIST_BINS + bins, minlength=sae.cfg.d_sae * HIST_BINS)
        assert torch.equal(st.hist, want_hist)
        n_checked = 0
        for l in range(sae.cfg.d_sae):
            a = dense[:, :, l]
            peak = a.max(1).values
            ppos = (a == peak[:, None]).float().argmax(1)  # the first position of the maximum
            want = sorted([c for c in range(B) if peak[c] > 0], key=lambda c: (-float(peak[c]), c))[:cfg.top_n]
            got = st.top.ctx[l][st.top.ctx[l] >= 0].tolist()
            assert got == want, (name, l, got, want)
            for j, c in enumerate(want):
                p = int(ppos[c])
                assert int(st.top.pos[l, j]) == p and float(st.top.value[l, j]) == float(peak[c])
                offs = torch.arange(p - cfg.before, p + cfg.after + 1)
                inside = (offs >= 0) & (offs < T)
                w = torch.zeros(cfg.window)
                w[inside] = a[c, offs[inside]]
                assert torch.equal(st.top.window[l, j], w), (name, l, j)
                n_checked += 1
            # samples: distinct real active tokens, as many as the latent has (up to `samples`)
            sc, sp = st.samp.ctx[l], st.samp.pos[l].long()
            real = sc >= 0
            assert int(real.sum()) == min(cfg.samples, int(active[:, :, l].sum()))
            pairs = set(zip(sc[real].tolist(), sp[real].tolist()))
            assert len(pairs) == int(real.sum())
            for j in real.nonzero().squeeze(1).tolist():
                assert float(st.samp.value[l, j]) == float(a[sc[j], sp[j]]) > 0
        assert n_checked > 20


def test_logit_effects_equal_float64(tiny_lm):
    g = torch.Generator().manual_seed(0)
    dec = torch.randn(37, 24, generator=g)
    W_U = torch.randn(301, 24, generator=g)
    gamma = torch.rand(24, generator=g) + 0.5
    got = logit_effects(dec, W_U, gamma, top=7, block=10)
    eff = (dec.double() * gamma.double()) @ W_U.double().t()
    hi = eff.topk(7, dim=1)
    lo = eff.topk(7, dim=1, largest=False)
    assert torch.equal(got["top_ids"], hi.indices) and torch.equal(got["bottom_ids"], lo.indices)
    assert_close(got["top_values"].double(), hi.values, rtol=1e-5, atol=1e-5)
    assert_close(got["bottom_values"].double(), lo.values, rtol=1e-5, atol=1e-5)
    # the LM's own unembedding and final norm gain
    W, gm = unembedding(tiny_lm.model)
    assert W.data_ptr() == tiny_lm.model.lm_head.weight.data_ptr()
    assert gm.data_ptr() == tiny_lm.model.model.norm.weight.data_ptr()


def test_hook_point_names_parse():
    assert parse_hook_point("blocks.15.hook_resid_post") == (15, "R")
    assert parse_hook_point("blocks.3.hook_attn_out") == (3, "A")
    assert parse_hook_point("blocks.18.hook_mlp_out") == (18, "M")
    assert parse_hook_point("blocks.3.ln2.hook_normalized") == (3, "TC")
    assert parse_hook_point("blocks.3.hook_resid_pre") is None


def _js_payload(path):
    t = path.read_text(encoding="utf-8")
    return json.loads(t[t.index(",") + 1:t.rindex(")")])


def test_analyze_a_suite_writes_documented_data(analyzed):
    model, suite = analyzed
    spec = resolve_run(suite)
    assert spec.is_suite and [m.name for m in spec.members] == ["L1R-8x", "L1R-32x"]
    for m in spec.members:
        an, dash = m.folder / "analysis", m.folder / "dashboard"
        s = json.loads((an / "features.json").read_text())
        assert s["format"] == FORMAT and s["sae"]["name"] == m.name and s["sae"]["layer"] == 1
        n = s["sae"]["d_sae"]
        assert n == (256 if m.name == "L1R-8x" else 1024)
        L = s["latents"]
        assert all(len(L[k]) == n for k in ("count", "frequency", "mean", "max", "peak_tokens", "logit_tokens"))
        # the corpus is the run's held-out split: the tokens eval.json counted
        assert s["corpus"]["held_out"] and s["corpus"]["tokens"] == m.eval["n_tokens"]
        assert s["dead"] == [i for i, c in enumerate(L["count"]) if c == 0]
        assert len(s["dead"]) == m.eval["dead_latents_eval"]  # same SAE, same tokens: the same dead latents
        assert sum(L["count"]) == round(m.eval["l0"] * m.eval["n_tokens"])
        assert s["density"]["live"] + s["density"]["dead"] == n and sum(s["density"]["counts"]) == s["density"]["live"]
        assert s["chunks"]["files"] == [f"latents/{i:05d}.json" for i in range(0, n, CHUNK)]
        assert _js_payload(dash / "data" / "features.js") == s
        recs = []
        for f in s["chunks"]["files"]:
            doc = json.loads((an / f).read_text())
            assert _js_payload(dash / "data" / f.replace(".json", ".js")) == doc
            recs += doc["latents"]
        assert [r["id"] for r in recs] == list(range(n))
        for r in recs:
            i = r["id"]
            if L["count"][i]:
                assert 1 <= len(r["top"]) <= min(6, L["count"][i])
                assert r["top"][0]["value"] == L["max"][i]
                vals = [c["value"] for c in r["top"]]
                assert vals == sorted(vals, reverse=True)
                for c in r["top"]:
                    j = c["pos"] - c["start"]
                    assert c["acts"][j] == c["value"] and len(c["tokens"]) == len(c["acts"])
                    assert all(str(t) in s["vocab"] for t in c["tokens"])
                assert sum(r["hist"]["counts"]) == L["count"][i]
                assert sum(len(g["items"]) for g in r["samples"]) == min(6, L["count"][i])
            else:
                assert L["count"][i] == 0 and r["samples"] == [] and i in s["dead"]
            assert len(r["logits"]["top"]) == 5 and r["logits"]["top"][0][1] >= r["logits"]["bottom"][0][1]
        assert (dash / "index.html").is_file()
        # the exported logit tables: the folded decoder through the tiny LM's final norm gain and
        # unembedding, in float64
        lm = load_model(model)
        W_U, gamma = unembedding(lm.model)
        eff = (m.load_sae().W_dec.double() * gamma.double()) @ W_U.double().t()
        hi, lo = eff.topk(5, dim=1), eff.topk(5, dim=1, largest=False)
        for r in recs:
            i = r["id"]
            assert [t for t, _ in r["logits"]["top"]] == hi.indices[i].tolist()
            assert [t for t, _ in r["logits"]["bottom"]] == lo.indices[i].tolist()
            for (_, v), w in zip(r["logits"]["top"] + r["logits"]["bottom"], hi.values[i].tolist() + lo.values[i].tolist()):
                assert v == pytest.approx(w, rel=1e-3, abs=1e-6)  # 4 significant digits in the file
    assert (suite / "dashboard" / "index.html").is_file()


def test_analyze_errors_name_the_argument(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "RUN" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "RUN" in err and "hyperparams.json" in err
    with pytest.raises(SystemExit):
        main(["--top", "0"])


def test_held_out_contexts_are_the_runs(tiny_suite):
    model, suite = tiny_suite
    from trainer.data import ContextData, load_documents

    lm = load_model(model)
    m = resolve_run(suite / "L1R-8x").members[0]
    c = held_out_contexts(m.train_config, lm)
    want = ContextData(load_documents(), lm.tokenizer, 64, 4, eval_every=5, eval_contexts=8, seed=42).eval
    assert torch.equal(c.contexts, want) and c.info["held_out"]
    more = held_out_contexts(m.train_config, lm, tokens=1024)
    assert torch.equal(more.contexts[:8], want) and len(more.contexts) == 16 and not more.info["held_out"]
    assert not math.isnan(c.info["tokens"])


def test_window_lookup_equals_comparing_every_slot():
    from trainer.analyze.stream import WindowLookup, latent_windows

    g = torch.Generator().manual_seed(0)
    B, T, k, d = 3, 17, 4, 23
    idx = torch.stack([torch.randperm(d, generator=g)[:k] for _ in range(B * T)]).reshape(B, T, k)
    val = torch.rand(B, T, k, generator=g) * (torch.rand(B, T, k, generator=g) > 0.3)
    val[1, 5] = 0  # a special token: all slots empty
    idx[1, 5] = 0
    S = 200
    lat, b, p = (torch.randint(0, d, (S,), generator=g), torch.randint(0, B, (S,), generator=g),
                 torch.randint(0, T, (S,), generator=g))
    want = latent_windows(val, idx, lat, b, p, 4, 3)
    assert torch.equal(WindowLookup(val, idx, d).windows(lat, b, p, 4, 3), want)
    assert (want > 0).sum() > 20


def _suite_json(members):
    """``suite.json`` as ``python -m trainer.run`` writes it for a suite: one object per member, its
    ``folder`` as the trainer saw it (relative to where the trainer ran)."""
    return {"members": [{"name": n, "layer": 1, "position": "R", "expansion": e, "folder": f"elsewhere/out/{n}",
                         "ranks": [0], "explained_variance": 0.5} for n, e in members],
            "model": "tiny", "seconds": {"total": 1.0}}


def test_suite_folder_with_and_without_suite_json(tiny_suite, tmp_path, capsys):
    import shutil

    from trainer.analyze.runs import RunError

    _, src = tiny_suite
    suite = tmp_path / "suite"
    for n in ("L1R-32x", "L1R-8x"):
        shutil.copytree(src / n, suite / n, ignore=shutil.ignore_patterns("analysis", "dashboard", "evaluations"))
    (suite / "resume").mkdir()  # other folders are not members
    # a folder of member folders, no suite.json: every member, in layer / position / width order
    assert [m.name for m in resolve_run(suite).members] == ["L1R-8x", "L1R-32x"]
    # suite.json in the trainer's format names the same members
    (suite / "suite.json").write_text(json.dumps(_suite_json([("L1R-8x", 8), ("L1R-32x", 32)])))
    spec = resolve_run(suite)
    assert spec.is_suite and [m.folder for m in spec.members] == [suite / "L1R-8x", suite / "L1R-32x"]
    # a member listed by path outside the folder joins; one listed but missing is an error naming suite.json
    outside = tmp_path / "kept" / "L1R-8x"
    shutil.copytree(suite / "L1R-8x", outside)
    doc = _suite_json([("L1R-32x", 32)])
    doc["members"].append({"name": "L1R-8x", "path": str(outside)})
    shutil.rmtree(suite / "L1R-8x")
    (suite / "suite.json").write_text(json.dumps(doc))
    assert [m.folder for m in resolve_run(suite).members] == [outside, suite / "L1R-32x"]
    doc["members"].append({"name": "L2R-8x", "folder": "elsewhere/out/L2R-8x"})
    (suite / "suite.json").write_text(json.dumps(doc))
    with pytest.raises(RunError, match=r"suite\.json lists 'L2R-8x'"):
        resolve_run(suite)
    (suite / "suite.json").write_text(json.dumps({"members": "L1R-8x"}))
    assert main([str(suite)]) == 2 and "suite.json: members: expected a list" in capsys.readouterr().err
    # end to end: python -m trainer.analyze on a suite with its suite.json, outputs under --output
    (suite / "suite.json").write_text(json.dumps(_suite_json([("L1R-32x", 32)])))
    out = tmp_path / "out"
    assert main([str(suite), "--no-progress", "--tokens", "128", "--top", "2", "--samples", "0",
                 "--logit-tokens", "0", "--output", str(out)]) == 0
    s = json.loads((out / "L1R-32x" / "analysis" / "features.json").read_text())
    assert s["sae"]["d_sae"] == 1024 and s["corpus"]["n_contexts"] == 2 and not s["has_logits"]
    assert (out / "L1R-32x" / "dashboard" / "index.html").is_file() and (out / "dashboard" / "index.html").is_file()
