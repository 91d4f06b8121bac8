"""The dashboard in a real browser: headless Chromium opens the pages from disk (no server), runs
their scripts, and the rendered DOM is checked against the analysis data."""
import json
import re
from pathlib import Path

import pytest

from browser import dump_dom, parse


def _load(member: Path):
    an = member / "analysis"
    s = json.loads((an / "features.json").read_text())
    recs = {}
    for f in s["chunks"]["files"]:
        for r in json.loads((an / f).read_text())["latents"]:
            recs[r["id"]] = r
    return s, recs


def _rows(root):
    return root.find_all(lambda n: n.tag == "tr" and "data-feature-id" in n.attrs)


def _shown(t):
    return t.replace("\n", "\u21b5").replace("\t", "\u21e5")


def test_feature_list_and_a_latents_top_context(analyzed):
    _, suite = analyzed
    member = suite / "L1R-8x"
    s, recs = _load(member)
    n = s["sae"]["d_sae"]
    L = s["latents"]
    live = [i for i in range(n) if L["count"][i]]
    lat = max(live, key=lambda i: (L["max"][i], -i))
    root = parse(dump_dom(member / "dashboard" / "index.html", f"latent={lat}"))
    rows = _rows(root)
    assert len(rows) == n  # every latent listed (page size 1000)
    # default order: the interpretability score, largest first (trainer/analyze/order.py)
    score_order = sorted(range(n), key=lambda i: (-L["score"][i], i))
    assert [int(r.attrs["data-feature-id"]) for r in rows] == score_order
    dead_rows = {int(r.attrs["data-feature-id"]) for r in rows if "dead" in r.classes}
    assert dead_rows == set(s["dead"])
    assert root.find_all(lambda x: x.attrs.get("id") == "density")  # the density histogram rendered
    # the latent's panel: its first top context, token by token, with the shading of its activation
    panel = root.find_all(lambda x: x.attrs.get("id") == "latent")
    assert panel and panel[0].attrs["data-latent"] == str(lat)
    lines = panel[0].find_all(lambda x: x.tag == "div" and "ctx" in x.classes and "top" in x.classes)
    rec = recs[lat]
    assert len(lines) == len(rec["top"]) >= 1
    want = rec["top"][0]
    toks = lines[0].find_all(lambda x: x.tag == "span" and "tok" in x.classes)
    assert [t.text for t in toks] == [_shown(s["vocab"][str(t)]) for t in want["tokens"]]
    assert [int(t.attrs["data-token"]) for t in toks] == want["tokens"]
    peak = [j for j, t in enumerate(toks) if "peak" in t.classes]
    assert peak == [want["pos"] - want["start"]]
    mx = L["max"][lat]
    shaded = 0
    for t, a in zip(toks, want["acts"]):
        assert float(t.attrs["data-act"]) == pytest.approx(a)
        style = t.attrs.get("style", "")
        if a > 0:
            m = re.search(r"background-color:\s*rgba?\(255,\s*112,\s*0(?:,\s*([0-9.]+))?\)", style)
            assert m, style
            alpha = float(m.group(1)) if m.group(1) else 1.0  # alpha 1 serialises as rgb(...)
            # the page writes alpha with 3 decimals; Chromium keeps it in 8 bits and prints the shortest decimal of
            # that byte (0.5583 -> "0.558" -> 142/255 -> "0.557"; 0.4567 -> "0.457" -> 117/255 -> "0.46"): 1/255 apart
            assert alpha == pytest.approx(min(1.0, a / mx), abs=1 / 255 + 1e-3)
            shaded += 1
        else:
            assert "background" not in style
    assert shaded >= 1
    assert float(toks[peak[0]].attrs["data-act"]) == pytest.approx(mx)
    # logit table and histogram
    assert panel[0].find_all(lambda x: x.attrs.get("id") == "logits")
    assert panel[0].find_all(lambda x: x.attrs.get("id") == "hist")


def _decile(L):
    live = sorted(f for f, c in zip(L["frequency"], L["count"]) if c)
    return live[int(0.9 * len(live))]


def test_default_order_opens_on_selective_latents_and_frequency_is_one_click_away(analyzed):
    _, suite = analyzed
    for name in ("L1R-8x", "L1R-32x"):
        member = suite / name
        s, recs = _load(member)
        L, n = s["latents"], s["sae"]["d_sae"]
        page = member / "dashboard" / "index.html"
        root = parse(dump_dom(page))
        first = [int(r.attrs["data-feature-id"]) for r in _rows(root)[:20]]
        p90 = _decile(L)
        assert all(L["frequency"][i] < p90 for i in first), [(i, L["frequency"][i]) for i in first]
        assert all(L["count"][i] and 2 * L["examples"][i] >= s["settings"]["top_n"] for i in first)
        # the sort control: a frequency column header (clicking it sorts by frequency), or #sort=frequency
        heads = {h.attrs.get("data-sort"): h for h in root.find_all(lambda x: x.tag == "th")}
        assert "sorted" in heads["score"].classes and "frequency" in heads
        rows = _rows(parse(dump_dom(page, "sort=frequency")))
        assert [int(r.attrs["data-feature-id"]) for r in rows] == sorted(
            range(n), key=lambda i: (-L["frequency"][i], i))[:1000]  # one page of 1000
        assert L["frequency"][int(rows[0].attrs["data-feature-id"])] >= p90


def test_latent_card_shows_examples_documents_and_nearest_latents(analyzed):
    _, suite = analyzed
    member = suite / "L1R-8x"
    s, recs = _load(member)
    L = s["latents"]
    lat = s["dominated"][0] if s["dominated"] else max(range(len(L["count"])), key=lambda i: (L["examples"][i], -i))
    root = parse(dump_dom(member / "dashboard" / "index.html", f"latent={lat}"))
    panel = root.find_all(lambda x: x.attrs.get("id") == "latent")[0]
    lines = panel.find_all(lambda x: x.tag == "div" and "ctx" in x.classes and "top" in x.classes)
    assert [int(x.attrs["data-doc"]) for x in lines] == [c["doc"] for c in recs[lat]["top"]]
    assert len(lines) == L["examples"][lat]
    assert bool(panel.find_all(lambda x: x.attrs.get("id") == "dominated")) == (lat in s["dominated"])
    # nearest latents by decoder cosine, each linking to its card
    near = panel.find_all(lambda x: x.tag == "tr" and "data-near-id" in x.attrs)
    assert [int(r.attrs["data-near-id"]) for r in near] == [j for j, _ in recs[lat]["nearest"]]
    hrefs = [a.attrs["href"] for r in near for a in r.find_all(lambda x: x.tag == "a")]
    assert hrefs == [f"#latent={j}" for j, _ in recs[lat]["nearest"]]
    # following one opens that latent's card
    j = recs[lat]["nearest"][0][0]
    other = parse(dump_dom(member / "dashboard" / "index.html", hrefs[0][1:]))
    assert other.find_all(lambda x: x.attrs.get("id") == "latent")[0].attrs["data-latent"] == str(j)


def test_default_top_gives_20_examples_where_the_corpus_allows(tiny_suite, tmp_path):
    """--top's default (20) on the default corpus: every live latent shows min(20, what its activations
    offer) examples, most of them all 20, and the card shows them."""
    from trainer.analyze.cli import main

    _, suite = tiny_suite
    out = tmp_path / "out"
    assert main([str(suite / "L1R-8x"), "--no-progress", "--samples", "0", "--logit-tokens", "0", "--nearest", "0",
                 "--output", str(out)]) == 0
    member = out / "L1R-8x"
    s, recs = _load(member)
    L = s["latents"]
    live = [i for i, c in enumerate(L["count"]) if c]
    full = [i for i in live if L["examples"][i] == 20]
    assert s["settings"]["top_n"] == 20 and len(full) >= 0.75 * len(live)
    lat = full[0]
    root = parse(dump_dom(member / "dashboard" / "index.html", f"latent={lat}"))
    panel = root.find_all(lambda x: x.attrs.get("id") == "latent")[0]
    assert len(panel.find_all(lambda x: x.tag == "div" and "ctx" in x.classes and "top" in x.classes)) == 20
    overview = root.find_all(lambda x: x.attrs.get("id") == "overview")[0].all_text()
    assert f"{len(full)} with all 20" in overview


def test_search_sort_and_paging(analyzed):
    _, suite = analyzed
    member = suite / "L1R-8x"
    s, _ = _load(member)
    L, n = s["latents"], s["sae"]["d_sae"]
    page = member / "dashboard" / "index.html"
    rows = _rows(parse(dump_dom(page, "q=42")))
    assert [r.attrs["data-feature-id"] for r in rows] == ["42"]
    # by token: latents whose peak or top logit tokens contain the text
    tok = "e"
    def has(i):
        return any(tok in s["vocab"][str(t)].strip().lower() for t in L["peak_tokens"][i] + L["logit_tokens"][i])
    want = [i for i in sorted(range(n), key=lambda i: (-L["max"][i], i)) if has(i)]
    assert want
    rows = _rows(parse(dump_dom(page, f"q={tok}&sort=max")))
    assert [int(r.attrs["data-feature-id"]) for r in rows] == want
    # a wider SAE than one page: 1000 listed, the pager says so
    wide = suite / "L1R-32x" / "dashboard" / "index.html"
    root = parse(dump_dom(wide, "sort=id&asc=1"))
    rows = _rows(root)
    assert [int(r.attrs["data-feature-id"]) for r in rows] == list(range(1000))
    shown = root.find_all(lambda x: x.attrs.get("id") == "shown")[0].text
    assert "1\u20131000 of 1024" in shown
    # the member pages link each other and the suite overview
    links = [a.attrs["href"] for a in root.find_all(lambda x: x.tag == "a" and "href" in x.attrs)]
    assert "../../dashboard/index.html" in links and "../../L1R-8x/dashboard/index.html" in links


def test_suite_overview_links_its_members(analyzed):
    _, suite = analyzed
    idx = suite / "dashboard" / "index.html"
    root = parse(dump_dom(idx))
    rows = root.find_all(lambda x: x.tag == "tr" and "data-member" in x.attrs)
    assert [r.attrs["data-member"] for r in rows] == ["L1R-8x", "L1R-32x"]
    for r in rows:
        a = r.find_all(lambda x: x.tag == "a")[0]
        assert (idx.parent / a.attrs["href"]).resolve().is_file()
