"""``python -m trainer.analyze probe RUN "text"``: the latents of each token of a text, printed and on a page,
against encoding the same tokens directly; the page in a real browser."""
import json

import pytest
import torch

from browser import dump_dom, parse
from trainer.analyze.cli import main
from trainer.analyze.probe import CODES_KEPT
from trainer.analyze.runs import resolve_run
from trainer.data.lm import activations, load_model

TEXT = "def f(x):\n    return x + 1  # probe"


def test_probe_prints_and_writes_each_tokens_latents(analyzed, capsys):
    model, suite = analyzed
    assert main(["probe", str(suite), TEXT, "--latents", "3"]) == 0
    out = capsys.readouterr().out
    lm = load_model(model)
    ids = [lm.tokenizer.bos_token_id] + lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    for m in resolve_run(suite).members:
        doc = json.loads((m.folder / "dashboard" / "probe.json").read_text())
        assert doc["format"] == "sae-kernels-probe/1" and doc["tokens"] == ids and doc["text"] == TEXT
        (s,) = doc["saes"]
        assert s["name"] == m.name and s["dashboard"] == "index.html"
        # the same tokens encoded directly: the most active latents of each, best first
        acts, _, keep = activations(lm, x, m.layer, m.position, lm.special_ids)
        with torch.no_grad():
            v, i = m.load_sae().encode_sparse(acts)
        assert s["codes"][0] == [] and not keep[0, 0]  # BOS: not encoded
        for row, p in enumerate(keep[0].nonzero().squeeze(1).tolist()):
            o = v[row].argsort(descending=True)[:CODES_KEPT]
            want = [(int(i[row, j]), float(v[row, j])) for j in o.tolist() if v[row, j] > 0]
            got = s["codes"][p]
            assert [a for a, _ in got] == [a for a, _ in want]
            assert [b for _, b in got] == pytest.approx([b for _, b in want], rel=1e-3)
        # printed: a header per SAE and one line per token with its 3 most active latents
        block = out.split(m.name + " (layer")[1].splitlines()[1:len(ids) + 1]
        assert len(block) == len(ids) and "special token" in block[0]
        for p, line in enumerate(block[1:], start=1):
            assert line.split()[0] == str(p)
            assert "  ".join(f"{a} ({b:.3g})" for a, b in s["codes"][p][:3]) in line
        # the latents' labels come from the analysis: their top tokens
        fs = json.loads((m.folder / "analysis" / "features.json").read_text())
        lid = s["codes"][1][0][0]
        assert s["labels"][str(lid)] == list(dict.fromkeys(fs["vocab"][str(t)] for t in fs["latents"]["peak_tokens"][lid]))[:3]


def test_probe_page_in_a_browser(analyzed, tmp_path):
    _, suite = analyzed
    page = tmp_path / "p" / "probe.html"
    assert main(["probe", str(suite), TEXT, "--output", str(page)]) == 0
    doc = json.loads((tmp_path / "p" / "probe.json").read_text())
    root = parse(dump_dom(page))
    sections = root.find_all(lambda x: x.tag == "section" and "data-sae" in x.attrs)
    assert [x.attrs["data-sae"] for x in sections] == ["L1R-8x", "L1R-32x"]
    for sec, s in zip(sections, doc["saes"]):
        rows = sec.find_all(lambda x: x.tag == "tr" and "probe-token" in x.classes)
        assert len(rows) == len(doc["tokens"])
        for p, r in enumerate(rows):
            links = [a.attrs["href"] for a in r.find_all(lambda x: x.tag == "a")]
            assert links == [f"{s['dashboard']}#latent={a}" for a, _ in s["codes"][p][:5]]
        assert (page.parent / s["dashboard"]).resolve().is_file()
        # the text, shaded by the latent most active on it
        best = max((c for row in s["codes"] for c in row), key=lambda c: c[1])
        assert sec.attrs["data-shaded"] == str(best[0])
        toks = sec.find_all(lambda x: x.tag == "span" and "tok" in x.classes and "data-pos" in x.attrs)
        assert len(toks) == len(doc["tokens"])
        for p, t in enumerate(toks):
            a = dict((k, v) for k, v in s["codes"][p]).get(best[0], 0)
            assert float(t.attrs["data-act"]) == pytest.approx(a)
            assert ("background-color" in t.attrs.get("style", "")) == (a > 0)


def test_probe_without_an_analysis_and_errors(tiny_suite, tmp_path, capsys):
    import shutil

    _, src = tiny_suite
    run = tmp_path / "L1R-8x"
    shutil.copytree(src / "L1R-8x", run, ignore=shutil.ignore_patterns("analysis", "dashboard", "evaluations"))
    assert main(["probe", str(run), "x = 1"]) == 0
    err = capsys.readouterr().err
    assert "not analysed" in err and f"python -m trainer.analyze {run}" in err
    doc = json.loads((run / "dashboard" / "probe.json").read_text())
    assert doc["saes"][0]["dashboard"] is None and doc["saes"][0]["labels"] == {}
    root = parse(dump_dom(run / "dashboard" / "probe.html"))
    assert not root.find_all(lambda x: x.tag == "a")  # no dashboard to link to
    assert "python -m trainer.analyze" in root.find_all(lambda x: x.tag == "section")[0].all_text()
    assert main(["probe", str(run), "   "]) == 2 and "TEXT" in capsys.readouterr().err
    assert main(["probe", str(run)]) == 2 and "TEXT" in capsys.readouterr().err
    assert main(["probe", str(run), "x", "--output", str(tmp_path / "p.json")]) == 2
    assert "--output" in capsys.readouterr().err
    assert main(["probe", str(tmp_path / "nope"), "x"]) == 2 and "RUN" in capsys.readouterr().err
