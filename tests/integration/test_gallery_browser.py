"""The gallery's pages in a real browser: headless Chromium (the distribution's package; .ci/run installs it,
and without it this test is skipped) loads a shard's page the gallery job wrote, follows its order menu's
links as a click does, and dumps the DOM: no console message, every sample's images there, the whole
shard's lowest (highest) score first, the hostile key present as text with no element injected."""

from __future__ import annotations

import io
import shutil
import subprocess
from html.parser import HTMLParser
from urllib.parse import urljoin

import pytest
from gallery_builders import CLIP, HOSTILE_KEY, HOSTILE_PROMPT, committed_output, local_put

from pipeline.config import validate
from pipeline.jobs import run_job

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")


class Dom(HTMLParser):
    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str) -> list[dict]:
        return [a for t, a in self.tags if t == tag]


def browse(url: str) -> tuple[str, list[str]]:
    """The DOM after the page's scripts ran, and the console messages Chromium logged."""
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


def order_link(dom: str, url: str, score: str, direction: str) -> str:
    """The URL the page's order menu links to for ``score`` lowest (``asc``) or highest (``desc``) first,
    resolved as a click resolves it."""
    hrefs = [a["href"] for a in Dom(dom).all("a")
             if a.get("class") == "order-link" and a["href"] == f"by-{score}-{direction}.html"]
    assert len(hrefs) == 1, hrefs
    return urljoin(url, hrefs[0])


def test_a_shard_sorted_by_clip_score_in_chromium(ray_cluster, tmp_path):
    committed_output(local_put, str(tmp_path / "out"), str(tmp_path / "in"))
    cfg = validate({"input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")},
                    "gallery": {"page_size": 3, "thumb_size": 32}})
    assert run_job(cfg, "gallery", out=io.StringIO())["shards_done"] == 2
    url = (tmp_path / "out" / "gallery" / "s0" / "index.html").as_uri()

    dom, console = browse(url)  # input order: samples 0-2 on page 1
    assert not console, console
    d = Dom(dom)
    assert [int(c["data-i"]) for c in d.all("figure")] == [0, 1, 2] and len(d.all("img")) == 2 * 3
    assert HOSTILE_KEY in "".join(d.text) and HOSTILE_PROMPT in "".join(d.text)
    assert not d.all("b") and not d.all("i") and not d.all("script")  # the markup in the data stayed text

    # CLIP score by index: 0.20 0.35 0.10 0.30 0.25, sample 5 unscored: the whole shard's order, 3 a page
    lowest = order_link(dom, url, "clip_score", "asc")
    dom, console = browse(lowest)
    assert not console, console
    cards = [int(c["data-i"]) for c in Dom(dom).all("figure")]
    assert cards == [2, 0, 4] and CLIP[cards[0]] == min(CLIP)  # sample 4 was on page 2 in input order

    dom, console = browse(order_link(dom, lowest, "clip_score", "desc"))
    assert not console, console
    d = Dom(dom)
    order = [1, 3, 4]  # highest first
    assert [int(c["data-i"]) for c in d.all("figure")] == order
    # each card's images with it: sample 3 has its further image
    assert [a.get("alt") for a in d.all("img")] == [a for i in order for a in
                                                    ("input", "output", *(("scale1",) if i == 3 else ()))]
    assert all(set(a) <= {"src", "alt", "width", "height", "loading"} for a in d.all("img"))  # none injected

    dom, console = browse((tmp_path / "out" / "gallery" / "index.html").as_uri())
    assert not console and "s1/rejects.html" in dom
