"""The one namer of hook points: ``L3R`` <-> its TransformerLens hooks <-> the hooks a capture reads."""
import pytest

from sae_kernels.sites import POSITIONS, Site, hook_layer, parse_hook


def test_hook_names_of_each_position():
    assert Site(15, "R").hooks == ("blocks.15.hook_resid_post",) * 2
    assert Site(18, "A").hooks == ("blocks.18.hook_attn_out",) * 2
    assert Site(18, "M").hooks == ("blocks.18.hook_mlp_out",) * 2
    assert Site(3, "TC").hooks == ("blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out")
    assert Site(3, "TC").reads == ("blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out")
    assert Site(3, "M").reads == ("blocks.3.hook_mlp_out",)
    assert Site(3, "TC").transcoder and not Site(3, "R").transcoder


@pytest.mark.parametrize("layer", [0, 7, 31])
@pytest.mark.parametrize("position", POSITIONS)
def test_every_name_round_trips(layer, position):
    site = Site(layer, position)
    assert Site.parse(site.name) == site
    assert Site.from_hooks(*site.hooks) == site
    assert Site.from_hooks(site.hooks[0]) == site  # the input hook alone names the site
    assert Site.parse_member(site.member(32)) == (site, 32)
    assert all(parse_hook(h)[0] == layer and hook_layer(h) == layer for h in site.reads)


def test_names_that_are_not_sites():
    for bad in ("L3RX", "L3", "3R", "L-1R", "l3r", "L3R-8x", ""):
        with pytest.raises(ValueError, match="--hookpoints: .* is not a hook point name"):
            Site.parse(bad, "--hookpoints")
    assert Site.parse_member("L3R") is None and Site.parse_member("L3RX-8x") is None
    assert Site.from_hooks("blocks.3.hook_resid_pre") is None and Site.from_hooks("mlp.3") is None
    assert Site.from_hooks("blocks.3.hook_attn_out", "blocks.3.hook_mlp_out") is None  # no such pair
    with pytest.raises(ValueError, match="position: expected one of R, A, M, TC"):
        Site(3, "X")
    with pytest.raises(ValueError, match="hook: expected"):
        parse_hook("blocks.3.hook_resid_pre")


def test_member_order_is_layer_then_r_a_m_tc():
    sites = [Site(3, "TC"), Site(3, "R"), Site(1, "M"), Site(3, "A"), Site(3, "M")]
    assert [s.name for s in sorted(sites, key=Site.sort_key)] == ["L1M", "L3R", "L3A", "L3M", "L3TC"]


def test_a_sweeps_member_names_parse_and_order_by_k(tmp_path):
    from trainer.analyze.runs import _member_order

    assert Site(12, "R").member(8, 50) == "L12R-8x-k50" and Site(12, "R").member(8) == "L12R-8x"
    assert Site.parse_member("L12R-8x-k50") == (Site(12, "R"), 8)
    assert Site.parse_member("L12R-k50") is None
    with pytest.raises(ValueError):
        Site.parse("L12R-8x-k50")
    names = ["L12R-8x-k100", "L12R-8x-k25", "L3R-8x", "L12R-8x-k50", "L12R-32x-k25", "notes"]
    got = [p.name for p in sorted((tmp_path / n for n in names), key=_member_order)]
    assert got == ["L3R-8x", "L12R-8x-k25", "L12R-8x-k50", "L12R-8x-k100", "L12R-32x-k25", "notes"]
