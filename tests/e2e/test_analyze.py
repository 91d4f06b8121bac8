"""trainer.analyze: the streaming selections against dense brute force, logit effects against float64,
the data files, and ``python -m trainer.analyze`` end to end on a suite."""
import json
import math

import pytest
import torch

from helpers import assert_close

from sae_kernels import SAEConfig, TopKSAE
from trainer.analyze.cli import main
from trainer.analyze.corpus import DEFAULT_CONTEXTS, analysis_contexts, held_out_contexts
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
            want = _brute_examples(a, cfg.window)[:cfg.pool]
            got = [(int(c), int(p)) for c, p in zip(st.top.ctx[l].tolist(), st.top.pos[l].tolist()) if c >= 0]
            assert got == [(c, p) for _, c, p in want], (name, l, got, want)
            for j, (v, c, p) in enumerate(want):
                assert float(st.top.value[l, j]) == v
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


def _brute_examples(a, W):
    """A latent's examples from its dense activations ``a [B, T]``, by the definition (features.py): the
    peak of each W-token segment of a context (earliest among equal), then greedily from the largest
    peak (ties: earlier position) keeping peaks at least W positions from every kept one; all contexts'
    examples as (value, ctx, pos), largest first (ties: earlier context, then position)."""
    out = []
    B, T = a.shape
    for c in range(B):
        cands = []
        for s0 in range(0, T, W):
            seg = a[c, s0:s0 + W]
            if (seg > 0).any():
                m = float(seg.max())
                cands.append((m, s0 + int((seg == m).nonzero()[0])))
        kept = []
        for v, p in sorted(cands, key=lambda x: (-x[0], x[1])):
            if all(abs(p - q) >= W for _, q in kept):
                kept.append((v, p))
        out += [(v, c, p) for v, p in kept]
    return sorted(out, key=lambda e: (-e[0], e[1], e[2]))


def test_example_candidates_equal_greedy_non_overlapping_peaks():
    from trainer.analyze.features import example_candidates

    g = torch.Generator().manual_seed(0)
    n_cases = 0
    for trial in range(24):
        B, d = 3, 5
        T = int(torch.randint(5, 90, (1,), generator=g))
        W = int(torch.randint(1, 12, (1,), generator=g))
        dense = (torch.randint(1, 5, (B, T, d), generator=g).float() / 2) * (torch.rand(B, T, d, generator=g) < 0.4)
        if trial % 3 == 0:  # rising activations: every segment's peak overlaps the next one's
            dense = (torch.arange(T).float() + 1)[None, :, None].expand(B, T, d).clone()
        b, t, l = dense.nonzero(as_tuple=True)
        order = torch.argsort(b * T + t, stable=True)  # stream order, as the pass sees it
        lat, bb, pp, vv = example_candidates(l[order], b[order], t[order], dense[b, t, l][order], B, T, W)
        got = list(zip(lat.tolist(), bb.tolist(), pp.tolist(), vv.tolist()))
        want = [(j, c, p, v) for j in range(d) for v, c, p in sorted(_brute_examples(dense[:, :, j], W),
                                                                       key=lambda e: (e[1], e[2]))]
        assert got == want, trial
        n_cases += len(want)
    assert n_cases > 100


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
    lm = load_model(model)
    for m in spec.members:
        an, dash = m.folder / "analysis", m.folder / "dashboard"
        s = json.loads((an / "features.json").read_text())
        assert s["format"] == FORMAT and s["sae"]["name"] == m.name and s["sae"]["layer"] == 1
        n = s["sae"]["d_sae"]
        assert n == (256 if m.name == "L1R-8x" else 1024)
        L = s["latents"]
        assert all(len(L[k]) == n for k in ("count", "frequency", "mean", "max", "peak_tokens", "logit_tokens"))
        # the default corpus: the run's held-out split first, then more of its data by the same rule
        assert s["corpus"]["held_out_contexts"] == 8 and s["corpus"]["n_contexts"] == DEFAULT_CONTEXTS
        assert not s["corpus"]["held_out"] and s["corpus"]["documents"] >= 2
        assert s["dead"] == [i for i, c in enumerate(L["count"]) if c == 0]
        assert sum(L["count"]) == 8 * s["corpus"]["tokens"]  # k = 8 latents on every token
        assert all(len(L[k]) == n for k in ("score", "concentration", "examples", "docs", "doc_max"))
        assert s["order"]["default"] == "score" and s["settings"]["nearest"] == 8
        assert s["density"]["live"] + s["density"]["dead"] == n and sum(s["density"]["counts"]) == s["density"]["live"]
        assert s["chunks"]["files"] == [f"latents/{i:05d}.json" for i in range(0, n, CHUNK)]
        assert _js_payload(dash / "data" / "features.js") == s
        from trainer.analyze.compare import unit_rows

        D = unit_rows(m.load_sae().W_dec).double()
        C = D @ D.t()
        C.fill_diagonal_(-2.0)
        near = C.topk(8, dim=1)
        recs = []
        for f in s["chunks"]["files"]:
            doc = json.loads((an / f).read_text())
            assert _js_payload(dash / "data" / f.replace(".json", ".js")) == doc
            recs += doc["latents"]
        assert [r["id"] for r in recs] == list(range(n))
        corpus = analysis_contexts(m.train_config, lm)
        win = s["settings"]["window_before"] + s["settings"]["window_after"] + 1
        for r in recs:
            i = r["id"]
            if L["count"][i]:
                assert 1 <= len(r["top"]) <= min(6, L["count"][i]) and len(r["top"]) == L["examples"][i]
                assert r["top"][0]["value"] == L["max"][i]
                vals = [c["value"] for c in r["top"]]
                assert vals == sorted(vals, reverse=True)
                for c in r["top"]:
                    j = c["pos"] - c["start"]
                    assert c["acts"][j] == c["value"] and len(c["tokens"]) == len(c["acts"])
                    assert all(str(t) in s["vocab"] for t in c["tokens"])
                    assert c["doc"] == int(corpus.docs[c["ctx"], c["pos"]])
                # several examples per context, their windows never overlapping
                for a in r["top"]:
                    for b in r["top"]:
                        assert a is b or a["ctx"] != b["ctx"] or abs(a["pos"] - b["pos"]) >= win
                per_doc = [sum(c["doc"] == d for c in r["top"]) for d in {c["doc"] for c in r["top"]}]
                assert L["docs"][i] == len(per_doc) and L["doc_max"][i] == max(per_doc)
                assert (i in s["dominated"]) == (len(r["top"]) >= 3 and max(per_doc) > 0.5 * len(r["top"]))
                assert 0 <= L["concentration"][i] <= 1 and L["score"][i] >= 0
                assert sum(r["hist"]["counts"]) == L["count"][i]
                assert sum(len(g["items"]) for g in r["samples"]) == min(6, L["count"][i])
            else:
                assert L["count"][i] == 0 and r["samples"] == [] and i in s["dead"]
                assert L["score"][i] == -1 and L["examples"][i] == 0
            # nearest latents by decoder cosine, against the full matrix
            nb = r["nearest"]
            assert len(nb) == 8 and [k for k, _ in nb] == near.indices[i].tolist()
            assert [c for _, c in nb] == pytest.approx(near.values[i].tolist(), abs=1e-3)
            assert len(r["logits"]["top"]) == 5 and r["logits"]["top"][0][1] >= r["logits"]["bottom"][0][1]
        assert (dash / "index.html").is_file()
        # the exported logit tables: the folded decoder through the tiny LM's final norm gain and
        # unembedding, in float64
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


def test_examples_reach_top_where_the_corpus_allows(analyzed):
    """Several examples per context: every live latent shows --top examples whenever its activations offer
    that many non-overlapping windows (on the tiny suite nearly all of them do), where one example per
    context used to cap them at the number of contexts."""
    from trainer.analyze.features import example_candidates

    model, suite = analyzed
    lm = load_model(model)
    for m in resolve_run(suite).members:
        s = json.loads((m.folder / "analysis" / "features.json").read_text())
        L, top = s["latents"], s["settings"]["top_n"]
        W = s["settings"]["window_before"] + s["settings"]["window_after"] + 1
        corpus = analysis_contexts(m.train_config, lm)
        sae = m.load_sae()
        n_cand = torch.zeros(sae.cfg.d_sae, dtype=torch.int64)
        for c0 in range(0, len(corpus.contexts), 32):
            ctx = corpus.contexts[c0:c0 + 32]
            x, _, keep = activations(lm, ctx, m.layer, m.position, corpus.special_ids)
            with torch.no_grad():
                v, i = sae.encode_sparse(x)
            bt = keep.nonzero()
            act = v > 0
            rows = act.nonzero()[:, 0]
            lat, b, t, val = i[act], bt[rows, 0], bt[rows, 1], v[act].float()
            n_cand += torch.bincount(example_candidates(lat, b, t, val, ctx.shape[0], ctx.shape[1], W)[0],
                                     minlength=sae.cfg.d_sae)
        live = [j for j in range(sae.cfg.d_sae) if L["count"][j]]
        assert [L["examples"][j] for j in live] == [min(top, int(n_cand[j])) for j in live]
        full = sum(L["examples"][j] == top for j in live)
        assert full >= 0.8 * len(live), (m.name, full, len(live))
        assert full > s["corpus"]["held_out_contexts"]  # more than the one-per-context cap of the held-out split


def test_held_out_only_reads_what_eval_json_measured(tiny_suite, tmp_path):
    _, suite = tiny_suite
    m = resolve_run(suite / "L1R-8x").members[0]
    out = tmp_path / "out"
    assert main([str(m.folder), "--held-out-only", "--no-progress", "--samples", "0", "--logit-tokens", "0",
                 "--nearest", "0", "--output", str(out)]) == 0
    s = json.loads((out / "L1R-8x" / "analysis" / "features.json").read_text())
    assert s["corpus"]["held_out"] and s["corpus"]["tokens"] == m.eval["n_tokens"]
    assert len(s["dead"]) == m.eval["dead_latents_eval"]  # same SAE, same tokens: the same dead latents
    assert sum(s["latents"]["count"]) == round(m.eval["l0"] * m.eval["n_tokens"])
    assert s["settings"]["nearest"] == 0 and "nearest" not in json.loads(
        (out / "L1R-8x" / "analysis" / "latents" / "00000.json").read_text())["latents"][0]


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


def test_analysis_contexts_start_with_the_held_out_split_and_grow_with_tokens(tiny_suite, tmp_path):
    """The analysis corpus: the run's held-out split first, then the rule continued, then the rule at the
    other offsets; --tokens adds contexts while the data has any; every token's document is known."""
    from trainer.analyze.corpus import DEFAULT_CONTEXTS, analysis_contexts
    from trainer.data import ContextData, load_documents

    model, suite = tiny_suite
    lm = load_model(model)
    m = resolve_run(suite / "L1R-8x").members[0]
    held = ContextData(load_documents(), lm.tokenizer, 64, 4, eval_every=5, eval_contexts=8, seed=42).eval
    c = analysis_contexts(m.train_config, lm)
    assert len(c.contexts) == DEFAULT_CONTEXTS and torch.equal(c.contexts[:8], held)
    assert c.info["held_out_contexts"] == 8 and not c.info["held_out"] and "held-out split first" in c.info["rule"]
    only = analysis_contexts(m.train_config, lm, held_out_only=True)
    assert torch.equal(only.contexts, held) and only.info["held_out"] and only.info["tokens"] == m.eval["n_tokens"]
    # a small text file: 3 paragraphs (documents), fewer contexts than asked: every context, by offset
    paras = ["The first paragraph talks about snakes and ladders. " * 6, "A second one, on tea. " * 9,
             "Third: a list of numbers 1 2 3 4 5 6 7 8 9 10 11 12 13. " * 5]
    f = tmp_path / "small.txt"
    f.write_text("\n\n".join(paras) + "\n")
    small = analysis_contexts(m.train_config, lm, dataset=str(f), context_len=32, tokens=10 ** 6)
    # brute force: tokenise each document, join with EOS, cut into BOS + 31 tokens, pad the last one
    tok = lm.tokenizer
    texts = list(load_documents(str(f)))
    assert len(texts) == 3
    stream, docs = [], []
    for j, p in enumerate(texts):
        ids = tok(p, add_special_tokens=False)["input_ids"]
        stream += ids + [tok.eos_token_id]
        docs += [j] * (len(ids) + 1)
    n = -(-len(stream) // 31)
    pad = [tok.pad_token_id] * (31 * n - len(stream))
    stream, docs = stream + pad, docs + [None] * len(pad)
    ctxs = [[tok.bos_token_id] + stream[i * 31:(i + 1) * 31] for i in range(n)]
    order = [i for ph in [4, 3, 2, 1, 0] for i in range(ph, n, 5)]  # eval_every 5: offset 4 first
    assert small.info["n_contexts"] == n and "the data holds only" in small.info["rule"]
    assert small.contexts.tolist() == [ctxs[i] for i in order]
    # a token's document: the documents started before it (an EOS closes a document and belongs to it)
    for r, i in enumerate(order):
        want = [docs[i * 31 + q] for q in range(31)]
        got = small.docs[r, 1:].tolist()
        assert [g for g, w in zip(got, want) if w is not None] == [w for w in want if w is not None], (r, i)
    assert small.info["documents"] == 3 and small.info["held_out_contexts"] == 0


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
