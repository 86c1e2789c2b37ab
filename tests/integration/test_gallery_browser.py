"""The gallery's pages in a real browser: headless Chromium (the distribution's package; .ci/run installs it,
and without it this test is skipped) loads a shard's page the gallery job wrote, sorted by ``?sort=``, and
dumps the DOM after its script ran: no console message, every sample's images there, the cards in the
order asked for, the hostile key present as text with no element injected."""

from __future__ import annotations

import io
import shutil
import subprocess
from html.parser import HTMLParser

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


def test_a_shard_page_sorted_by_clip_score_in_chromium(ray_cluster, tmp_path):
    committed_output(local_put, str(tmp_path / "out"), str(tmp_path / "in"))
    cfg = validate({"input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")},
                    "gallery": {"page_size": 5, "thumb_size": 32}})
    assert run_job(cfg, "gallery", out=io.StringIO())["shards_done"] == 2
    page = tmp_path / "out" / "gallery" / "s0" / "index.html"

    dom, console = browse(page.as_uri() + "?sort=clip_score")
    assert not console, console
    d = Dom(dom)
    cards = d.all("figure")
    # page 1 holds samples 0-4: input | output each, and sample 3's further image
    assert len(cards) == 5 and len(d.all("img")) == 2 * 5 + 1
    order = sorted(range(5), key=lambda i: -CLIP[i])  # highest CLIP score first: 1, 3, 4, 0, 2
    assert [int(c["data-i"]) for c in cards] == order
    # each card's images moved with it: sample 3 has its further image
    assert [a.get("alt") for a in d.all("img")] == [a for i in order for a in
                                                    ("input", "output", *(("scale1",) if i == 3 else ()))]
    assert HOSTILE_KEY in "".join(d.text) and HOSTILE_PROMPT in "".join(d.text)
    assert not d.all("b") and not d.all("i")  # the prompt's and the caption's markup stayed text
    assert all(set(a) <= {"src", "alt", "width", "height", "loading"} for a in d.all("img"))  # none injected
    assert len(d.all("script")) == 2

    dom, console = browse(page.as_uri() + "?sort=clip_score.asc")
    assert not console, console
    assert [int(c["data-i"]) for c in Dom(dom).all("figure")] == sorted(range(5), key=lambda i: CLIP[i])

    dom, console = browse(page.as_uri())  # no sort asked: input order
    assert not console and [int(c["data-i"]) for c in Dom(dom).all("figure")] == list(range(5))

    dom, console = browse((tmp_path / "out" / "gallery" / "index.html").as_uri())
    assert not console and "s1/rejects.html" in dom
