"""A real headless browser for the dashboard tests: Debian's chromium-headless-shell or chromium.

``.ci/run`` installs it with apt-get. Locally, a test skips (with the reason) when no browser is
installed; under CI (``CI`` set) a missing browser fails the test instead, so CI cannot pass blind.
"""
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

CANDIDATES = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def browser() -> str:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    msg = ("no headless Chromium found (looked for " + ", ".join(CANDIDATES) + "); install it with "
           "'apt-get install -y chromium-headless-shell' (Debian), as .ci/run does")
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def _run(args, timeout=60) -> subprocess.CompletedProcess:
    exe = browser()
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
               f"--user-data-dir={profile}", "--virtual-time-budget=15000", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def dump_dom(page: Path, fragment: str = "") -> str:
    """The DOM of ``page`` (opened from disk) after its scripts ran."""
    url = Path(page).resolve().as_uri() + (f"#{fragment}" if fragment else "")
    r = _run(["--dump-dom", url])
    assert r.returncode == 0 and "<html" in r.stdout, f"browser failed: rc {r.returncode}\n{r.stderr[-2000:]}"
    return r.stdout


def screenshot(page: Path, out: Path, fragment: str = "", size=(1400, 900)) -> None:
    url = Path(page).resolve().as_uri() + (f"#{fragment}" if fragment else "")
    r = _run([f"--window-size={size[0]},{size[1]}", "--hide-scrollbars", f"--screenshot={out}", url])
    assert r.returncode == 0 and Path(out).is_file(), r.stderr[-2000:]


class Node:
    def __init__(self, tag, attrs, parent):
        self.tag, self.attrs, self.parent, self.children, self.text = tag, dict(attrs), parent, [], ""

    @property
    def classes(self):
        return (self.attrs.get("class") or "").split()

    def iter(self):
        yield self
        for c in self.children:
            yield from c.iter()

    def find_all(self, pred):
        return [n for n in self.iter() if pred(n)]

    def all_text(self):
        return self.text + "".join(c.all_text() for c in self.children)


class _Tree(HTMLParser):
    VOID = {"meta", "br", "input", "img", "link", "hr", "col", "area", "base", "source", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {}, None)
        self.cur = self.root

    def handle_starttag(self, tag, attrs):
        n = Node(tag, attrs, self.cur)
        self.cur.children.append(n)
        if tag not in self.VOID:
            self.cur = n

    def handle_endtag(self, tag):
        n = self.cur
        while n is not None and n.tag != tag:
            n = n.parent
        if n is not None and n.parent is not None:
            self.cur = n.parent

    def handle_data(self, data):
        # text after a child belongs to the child's tail in real trees; for our checks, to the parent
        self.cur.text += data


def parse(html: str) -> Node:
    t = _Tree()
    t.feed(html)
    return t.root
