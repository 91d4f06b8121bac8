"""The static dashboard: ``<member>/dashboard/index.html`` plus its data beside it.

The page is one HTML file with its CSS and JavaScript inlined (no server, no CDN, no build step);
its data are the analysis JSON documents, each wrapped as ``SAEDash.data("<name>", <json>);`` in
``dashboard/data/<name>.js`` so that a browser opening the page from disk can load them with
``<script>`` tags (``fetch`` is refused on ``file://``). A suite gets ``<suite>/dashboard/index.html``
listing its members; every member page links the other SAEs analysed with it.
"""
from __future__ import annotations

import html
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional

from sae_kernels.atomic import atomic_write_text

ASSETS = "assets"


def asset(name: str) -> str:
    return resources.files(__package__).joinpath(ASSETS, name).read_text(encoding="utf-8")


def _script_text(s: str) -> str:
    return s.replace("</script", "<\\/script")


def wrap_data(name: str, json_text: str) -> str:
    return f"SAEDash.data({json.dumps(name)}, {_script_text(json_text)});\n"


def write_data(dash_dir: Path, name: str, json_text: str) -> None:
    """``dash_dir/data/<name without .json>.js`` holding the JSON document ``name``."""
    path = dash_dir / "data" / (name[:-5] if name.endswith(".json") else name)
    path = path.with_name(path.name + ".js")
    atomic_write_text(path, wrap_data(name, json_text))


def page(title: str, body: str, scripts: List[str], data_scripts: List[str], tail: str) -> str:
    inline = "\n".join(f"<script>\n{_script_text(s)}\n</script>" for s in scripts)
    srcs = "\n".join(f'<script src="{html.escape(s)}"></script>' for s in data_scripts)
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>\n{asset('dashboard.css')}\n</style></head>\n"
        f"<body>\n{body}\n{inline}\n{srcs}\n<script>{tail}</script>\n</body></html>\n"
    )


def write_member_page(dash_dir: Path, name: str, links: Dict[str, Any]) -> Path:
    """``dash_dir/index.html``: the feature list and latent panels of one SAE."""
    body = ('<header id="head"></header>\n<main>\n<div><section id="overview"></section>\n'
            '<section id="list" style="margin-top:14px"></section></div>\n'
            '<section id="panel"><p class="empty">Select a latent in the list (or open index.html#latent=N).</p>'
            '</section>\n</main>')
    compares = dash_dir / "data" / "compares.js"
    if not compares.exists():
        write_data(dash_dir, "compares", "[]")
    text = page(f"{name} - SAE dashboard", body, [asset("dashboard.js"), f"SAEDash.links({json.dumps(links)});"],
                ["data/features.js", "data/compares.js"], "SAEDash.start();")
    out = dash_dir / "index.html"
    atomic_write_text(out, text)
    return out


def rel(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target, start)).as_posix()


def member_links(dash_dir: Path, here: str, members: List[Dict[str, Any]], suite_index: Optional[Path]) -> Dict[str, Any]:
    """Links from one member page to every SAE analysed with it (``members``: name, dashboard dir)."""
    return {
        "suite": rel(suite_index, dash_dir) if suite_index else None,
        "members": [{"name": m["name"], "href": rel(m["dashboard"] / "index.html", dash_dir),
                     "here": m["key"] == here} for m in members],
    }


def write_suite_page(suite_dir: Path, title: str, members: List[Dict[str, Any]]) -> Path:
    """``suite_dir/dashboard/index.html``: one row per member with its headline numbers and a link."""
    dash = suite_dir / "dashboard"
    dash.mkdir(parents=True, exist_ok=True)
    rows = []
    for m in members:
        ev = m.get("eval") or {}

        def num(key, digits=4):
            v = ev.get(key)
            return f"{v:.{digits}f}" if isinstance(v, (int, float)) else ""

        rows.append(
            f'<tr class="member" data-member="{html.escape(m["name"])}">'
            f'<td style="text-align:left"><a href="{html.escape(rel(m["dashboard"] / "index.html", dash))}">'
            f'{html.escape(m["name"])}</a></td><td>{m["layer"]}</td><td>{html.escape(m["position"])}</td>'
            f'<td>{m["d_sae"]}</td><td>{m["live"]}</td><td>{m["dead"]}</td><td>{num("explained_variance")}</td>'
            f'<td>{num("l0", 2)}</td><td>{num("delta_lm_loss")}</td></tr>'
        )
    body = (f'<header><h1>{html.escape(title)}</h1><div class="meta">{len(members)} SAEs analysed in one LM pass'
            '</div></header>\n<main style="grid-template-columns:1fr"><section><h2>Members</h2>'
            '<table id="members"><tr><th style="text-align:left">SAE</th><th>layer</th><th>position</th>'
            '<th>latents</th><th>live</th><th>dead</th><th>EV</th><th>L0</th><th>&Delta; LM loss</th></tr>'
            + "".join(rows) + "</table></section></main>")
    out = dash / "index.html"
    atomic_write_text(out, page(title, body, [], [], ""))
    return out
