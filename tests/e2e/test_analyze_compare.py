"""``python -m trainer.analyze compare``: blocked matches, families and co-firing against brute force;
the CLI end to end on a suite's two widths, and its page in a real browser."""
import json

import pytest
import torch

from browser import dump_dom, parse
from trainer.analyze.compare import unit_rows
from trainer.analyze.compare_cli import main


def test_compare_cli_on_two_widths(analyzed):
    _, suite = analyzed
    a, b = suite / "L1R-8x", suite / "L1R-32x"
    assert main([str(a), str(b), "--no-progress", "--threshold", "0.5", "--map", "pca", "--block", "100"]) == 0
    doc = json.loads((a / "analysis" / "compare-L1R-32x.json").read_text())
    assert doc["format"] == "sae-kernels-compare/1" and doc["parent"] == "a"
    from sae_kernels import TopKSAE

    Da = unit_rows(TopKSAE.from_llama_scope(a).W_dec).double()
    Db = unit_rows(TopKSAE.from_llama_scope(b).W_dec).double()
    S = Da @ Db.t()
    assert doc["a_best"]["ids"] == S.argmax(1).tolist() and doc["b_best"]["ids"] == S.argmax(0).tolist()
    assert max(abs(x - y) for x, y in zip(doc["a_best"]["cos"], S.max(1).values.tolist())) < 1e-3
    assert sum(doc["hist"]["a_to_b"]) == 256 and sum(doc["hist"]["b_to_a"]) == 1024
    assert doc["same_index_best"] == int((S.argmax(1) == torch.arange(256)).sum())
    # liveness on the corpus (the run's held-out split, which the analysis also ran on): the same dead latents
    live_a = [c > 0 for c in json.loads((a / "analysis" / "features.json").read_text())["latents"]["count"]]
    live_b = [c > 0 for c in json.loads((b / "analysis" / "features.json").read_text())["latents"]["count"]]
    assert doc["map"]["dead_a"] == [i for i, v in enumerate(live_a) if not v]
    assert doc["map"]["dead_b"] == [i for i, v in enumerate(live_b) if not v]
    assert sum(doc["hist"]["a_to_b_live"]) == sum(live_a) and sum(doc["hist"]["b_to_a_live"]) == sum(live_b)
    live_best = S.max(1).values[torch.tensor(live_a)]
    assert doc["median_best_cos"]["a_to_b_live"] == pytest.approx(float(live_best.float().median()), abs=1e-3)
    # families among live latents: a live parent and its live children at cosine >= threshold
    assert doc["families_of"] == "latents active on the corpus"
    fams = {f["parent"]: f for f in doc["families"]}
    n_fams = 0
    for i in range(256):
        kids = [c for c in (S[i] >= 0.5).nonzero().squeeze(1).tolist() if live_b[c]]
        if not kids or not live_a[i]:
            assert i not in fams
            continue
        n_fams += 1
        got = sorted(c[0] for c in fams[i]["children"])
        assert got == sorted(kids) if len(kids) <= 16 else fams[i]["capped"]
        for c in fams[i]["children"]:
            assert c[2] <= fams[i]["parent_count"] and (c[3] is None or 0 <= c[3] <= 1)
    assert n_fams == len(fams) > 0
    assert len(doc["map"]["a"]) == 256 and len(doc["map"]["b"]) == 1024 and doc["map"]["method"] == "pca"
    for f in ("compare-L1R-32x-similarity.svg", "compare-L1R-32x-map.svg"):
        assert (a / "analysis" / f).read_text().startswith("<svg")
    # the page, in a real browser: the families table and the link back to the dashboard
    page = a / "dashboard" / "compare-L1R-32x.html"
    root = parse(dump_dom(page))
    rows = root.find_all(lambda x: x.tag == "tr" and "data-feature-id" in x.attrs)
    assert [int(r.attrs["data-feature-id"]) for r in rows] == [f["parent"] for f in doc["families"][:500]]
    assert root.find_all(lambda x: x.attrs.get("id") == "map") and root.find_all(lambda x: x.attrs.get("id") == "hist-a_to_b")
    child_links = [x.attrs["href"] for x in rows[0].find_all(lambda x: x.tag == "a")]
    assert child_links[0] == f"index.html#latent={doc['families'][0]['parent']}"
    assert child_links[1].startswith("../../L1R-32x/dashboard/index.html#latent=")
    # families show each latent's top tokens, from the analyses of both SAEs
    assert doc["analysed"] == {"a": True, "b": True}
    for w, folder in (("a", a), ("b", b)):
        fs = json.loads((folder / "analysis" / "features.json").read_text())
        for lid, toks in doc["tokens"][w].items():
            want = list(dict.fromkeys(fs["vocab"][str(t)] for t in fs["latents"]["peak_tokens"][int(lid)]))[:3]
            assert toks == want
    f0 = doc["families"][0]
    assert set(doc["tokens"]["a"]) >= {str(f["parent"]) for f in doc["families"]}
    assert set(doc["tokens"]["b"]) >= {str(k[0]) for f in doc["families"] for k in f["children"]}
    labs = [x.all_text().strip() for x in rows[0].find_all(lambda x: x.tag == "span" and "lab" in x.classes)]
    want_labs = [" ".join(json.dumps(t) for t in doc["tokens"][w][str(i)])
                 for w, i in [("a", f0["parent"])] + [("b", k[0]) for k in f0["children"]] if doc["tokens"][w][str(i)]]
    assert labs == want_labs and labs
    assert not root.find_all(lambda x: x.attrs.get("id") in ("hint-a", "hint-b"))
    # listed on the member page
    idx = parse(dump_dom(a / "dashboard" / "index.html"))
    assert "compare-L1R-32x.html" in [x.attrs.get("href") for x in idx.find_all(lambda x: x.tag == "a")]


def test_compare_links_only_dashboards_that_exist(tiny_suite, tmp_path):
    """Before either SAE is analysed the page links no dashboard and says how to make them; once B is
    analysed, B's latents link to its dashboard and show their top tokens."""
    import shutil

    from trainer.analyze.cli import main as analyze_main

    _, src = tiny_suite
    a, b = tmp_path / "L1R-8x", tmp_path / "L1R-32x"
    for m, dst in (("L1R-8x", a), ("L1R-32x", b)):
        shutil.copytree(src / m, dst, ignore=shutil.ignore_patterns("analysis", "dashboard", "evaluations"))
    args = [str(a), str(b), "--no-progress", "--threshold", "0.5", "--map", "pca", "--no-cofire"]
    assert main(args) == 0
    doc = json.loads((a / "analysis" / "compare-L1R-32x.json").read_text())
    assert doc["links"] == {"a": None, "b": None} and doc["analysed"] == {"a": False, "b": False}
    assert doc["tokens"] == {"a": None, "b": None}
    page = a / "dashboard" / "compare-L1R-32x.html"
    root = parse(dump_dom(page))
    assert not [x for x in root.find_all(lambda x: x.tag == "a") if "index.html" in x.attrs.get("href", "")]
    for w, folder in (("a", a), ("b", b)):
        hint = root.find_all(lambda x: x.attrs.get("id") == f"hint-{w}")
        assert hint and f"python -m trainer.analyze {folder}" in hint[0].all_text()
    rows = root.find_all(lambda x: x.tag == "tr" and "data-feature-id" in x.attrs)
    assert rows and not rows[0].find_all(lambda x: x.tag == "a")
    # analyse B only, compare again: B linked, with its top tokens; A still plain, with the hint
    assert analyze_main([str(b), "--no-progress", "--samples", "0", "--logit-tokens", "0", "--nearest", "0"]) == 0
    assert main(args) == 0
    doc = json.loads((a / "analysis" / "compare-L1R-32x.json").read_text())
    assert doc["links"] == {"a": None, "b": "../../L1R-32x/dashboard/index.html"} and doc["tokens"]["a"] is None
    assert doc["analysed"] == {"a": False, "b": True} and doc["tokens"]["b"]
    root = parse(dump_dom(page))
    assert root.find_all(lambda x: x.attrs.get("id") == "hint-a") and not root.find_all(lambda x: x.attrs.get("id") == "hint-b")
    rows = root.find_all(lambda x: x.tag == "tr" and "data-feature-id" in x.attrs)
    hrefs = [x.attrs["href"] for x in rows[0].find_all(lambda x: x.tag == "a")]
    kids = doc["families"][0]["children"]
    assert hrefs == [f"../../L1R-32x/dashboard/index.html#latent={k[0]}" for k in kids]
    assert (page.parent / hrefs[0].split("#")[0]).resolve().is_file()


def test_compare_errors(analyzed, capsys):
    _, suite = analyzed
    assert main([str(suite), str(suite / "L1R-8x")]) == 2
    assert "RUN_A" in capsys.readouterr().err
    assert main([str(suite / "L1R-8x"), str(suite / "nope")]) == 2
    err = capsys.readouterr().err
    assert "RUN_B" in err and "no such folder" in err
    assert main([str(suite / "L1R-8x"), str(suite / "L1R-8x")]) == 2
    assert main([str(suite / "L1R-8x"), str(suite / "L1R-32x"), "--threshold", "2"]) == 2
    assert "--threshold" in capsys.readouterr().err


def test_compare_page_draws_a_32k_by_128k_map(tmp_path):
    """The page at the widths the comparison is built for (32K x 128K latents): the map's bounds over
    160K points (Math.min.apply over that many arguments overflows the browser's stack)."""
    from trainer.analyze.compare_cli import HIST_EDGES
    from trainer.analyze.dashboard import asset, page, write_data

    g = torch.Generator().manual_seed(0)
    na, nb = 32768, 131072
    pts = (torch.randn(na + nb, 2, generator=g) * 3).round(decimals=3).tolist()
    zeros = [0] * (len(HIST_EDGES) - 1)
    doc = {"a": {"name": "L15R-8x", "d_sae": na}, "b": {"name": "L15R-32x", "d_sae": nb}, "parent": "a",
           "threshold": 0.6, "corpus": None, "hist": {"edges": HIST_EDGES, "a_to_b": zeros, "b_to_a": zeros},
           "families": [{"parent": 7, "parent_count": None, "any_child_rate": None, "capped": False,
                         "children": [[11, 0.8, None, None, None]]}],
           "map": {"method": "pca", "a": pts[:na], "b": pts[na:], "dead_a": [0, 1], "dead_b": None},
           "links": {"a": "index.html", "b": None}}
    write_data(tmp_path, "compare-big", json.dumps(doc))
    html = tmp_path / "compare-big.html"
    html.write_text(page("big", '<header id="head"></header><main id="cmp"></main>', [asset("compare.js")],
                         ["data/compare-big.js"], 'SAECompare.start("compare-big");'), encoding="utf-8")
    root = parse(dump_dom(html))
    info = root.find_all(lambda x: x.attrs.get("id") == "map-info")
    assert info and f"L15R-8x ({na})" in info[0].all_text() and f"L15R-32x ({nb})" in info[0].all_text()
    assert [r.attrs["data-feature-id"] for r in root.find_all(lambda x: x.tag == "tr" and "data-feature-id" in x.attrs)] == ["7"]
