"""The gallery's pages (pipeline/data/gallery_pages.py) and one shard's build (pipeline/data/gallery.py) on a
local output, without Ray: escaping of hostile keys and prompts, paging, thumbnails of bounded size, the
whole shard in each score's order, the index's pages, relative links that resolve, and the wiring of
``output.gallery``. The job end to end (Ray, S3, re-runs)
is tests/integration/test_gallery_job.py; a real browser on its pages, test_gallery_browser.py."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from gallery_builders import CLIP, HOSTILE_KEY, HOSTILE_PROMPT, committed_output, local_put, s0_keys
from PIL import Image

from pipeline.config import GalleryConfig, validate
from pipeline.data.gallery import build_shard, write_index
from pipeline.data.gallery_pages import (
    INPUT_ORDER,
    PAGER_REACH,
    Card,
    Picture,
    grid_page,
    in_order,
    link,
    orders,
    page_count,
    page_file,
    shard_folder,
)
from pipeline.data.outputs import OutputStore
from pipeline.errors import ConfigError


class Page(HTMLParser):
    """A page as a browser's parser sees it: its elements with their attributes, its text, its scripts."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data
        else:
            self.text.append(data)

    def all(self, tag: str) -> list[dict]:
        return [a for t, a in self.tags if t == tag]

    def links(self) -> list[str]:
        return [a[n] for _, a in self.tags for n in ("href", "src") if n in a]


def hostile_card(index: int = 0) -> Card:
    return Card(index, HOSTILE_KEY, [Picture("input", src=link("thumbs", "000000.in.webp"), width=8, height=8),
                                     Picture("output", note="cannot decode <svg onload=alert(5)>")],
                scores={"clip_score": 0.25}, provenance={"target_condition": HOSTILE_PROMPT, "key": HOSTILE_KEY},
                texts={"txt": "</script><script>alert(6)</script>"})


def test_a_hostile_key_and_prompt_render_as_text():
    page = Page(grid_page("s</script>0", [hostile_card()], 1, 1, 1, 0, order=orders(["clip_score"])[1]))
    # the elements are the page's own: one img (the input thumbnail), no script at all, no injected element
    assert [a.get("alt") for a in page.all("img")] == ["input"]
    assert all("onerror" not in a and "onload" not in a for _, a in page.tags)
    assert not page.all("script") and not page.all("b") and not page.all("svg")
    text = "".join(page.text)
    assert HOSTILE_KEY in text and HOSTILE_PROMPT in text and "s</script>0" in text
    assert "</script><script>alert(6)</script>" in text and "cannot decode <svg onload=alert(5)>" in text
    # the hover text holds the key as an attribute value, not markup
    assert HOSTILE_KEY in page.all("figure")[0]["title"] and "CLIP score 0.2500" in page.all("figure")[0]["title"]
    # the order menu: the page's order as text, the others links to their first page (our names, not the data's)
    assert [a["href"] for a in page.all("a") if a.get("class") == "order-link"] == ["index.html",
                                                                                  "by-clip_score-desc.html"]


def test_links_are_relative_and_percent_encoded():
    assert link("a b#?", "x y.html") == "a%20b%23%3F/x%20y.html"
    assert link("..", "index.html") == "../index.html"
    assert link("http://evil", "x") == "http%3A%2F%2Fevil/x"  # a segment never becomes a scheme or a root
    assert link("/abs") == "%2Fabs"
    assert shard_folder("..") != ".." and shard_folder("index.html") != "index.html" and shard_folder("a b") == "a b"


def test_paging_bounds_a_page_and_its_pager():
    assert page_count(0, 10) == 1 and page_count(10, 10) == 1 and page_count(11, 10) == 2
    assert [page_file(k) for k in (1, 2)] == ["index.html", "page-2.html"]
    assert [page_file(k, "rejects") for k in (1, 3)] == ["rejects.html", "rejects-3.html"]
    cards = [Card(500 + i, f"k{i}", [Picture("output", note="x")]) for i in range(3)]
    page = Page(grid_page("s", cards, 51, 1000, 10_000, 0))
    pager = [a["href"] for a in page.all("a") if a.get("class") == "page-link"]
    # one pager above and one below the grid, each: previous, next, the first and last page and the reach
    # around page 51
    assert len(pager) == 2 * (2 + 2 + 2 * PAGER_REACH)
    assert [a["href"] for a in page.all("a") if a.get("rel") in ("prev", "next")] == ["page-50.html", "page-52.html"] * 2
    assert "index.html" in pager and "page-1000.html" in pager and "page-47.html" in pager and "page-56.html" not in pager
    assert "samples 501–503 of 10000" in "".join(page.text)


@pytest.fixture
def output(tmp_path) -> tuple[Path, dict]:
    made = committed_output(local_put, str(tmp_path / "out"), str(tmp_path / "in"))
    return tmp_path, made


def build(tmp_path: Path, shard: str, gallery: GalleryConfig, inputs: bool = True):
    store = OutputStore(str(tmp_path / "out"), {})
    sources = [("job", store.rejects(shard)), ("score", store.path("_score", "_rejects", f"{shard}.jsonl"))]
    input_uri = str(tmp_path / "in" / f"{shard}.tar")
    return build_shard(store, shard, input_uri if inputs else None, {} if inputs else None, sources,
                       page_size=gallery.page_size, thumb_size=gallery.thumb_size,
                       thumb_quality=gallery.thumb_quality, max_pixels=10_000_000)


def test_a_shard_is_pages_of_bounded_thumbnails_with_scores_and_rejects(output):
    tmp_path, _ = output
    summary, keys = build(tmp_path, "s0", GalleryConfig(page_size=4, thumb_size=24))
    root = tmp_path / "out" / "gallery" / "s0"
    assert keys == s0_keys() and summary["samples"] == 6 and summary["pages"] == 2 and summary["paired"] == 6
    assert summary["rejects"] == {"job": 1, "score": 1} and summary["scored"] == 5
    assert summary["mean_clip_score"] == pytest.approx(sum(CLIP) / 5, abs=1e-4)
    assert summary["settings"]["target_condition"] == HOSTILE_PROMPT and "key" not in summary["settings"]
    assert summary["orders"] == ["page", *(f"by-{s}-{d}" for s in ("clip_score", "directional", "psnr", "ssim")
                                           for d in ("asc", "desc"))]
    assert sorted(p.name for p in root.glob("*.html") if not p.name.startswith("by-")) == [
        "index.html", "page-2.html", "rejects.html"]
    assert len(list(root.glob("by-*.html"))) == 8 * 2  # each score's two orders, of 2 pages each
    first, second = (Page((root / f).read_text()) for f in ("index.html", "page-2.html"))
    assert len(first.all("figure")) == 4 and len(second.all("figure")) == 2
    # input | output per sample, and the further image of sample 3: 4·2 + 1 on page 1, 2·2 on page 2
    assert len(first.all("img")) == 9 and len(second.all("img")) == 4
    assert [a["alt"] for a in first.all("img")][6:9] == ["input", "output", "scale1"]
    for img in first.all("img") + second.all("img"):
        with Image.open(root / img["src"]) as im:
            assert im.format == "WEBP" and max(im.size) <= 24 and im.size == (int(img["width"]), int(img["height"]))
    with Image.open(root / "thumbs" / "000000.webp") as im:
        assert im.size == (24, 16)  # 48×32 kept in proportion
    text = "".join(first.text)
    # the run's settings once at the top (the hostile prompt as text), each card its sample's own fields
    assert text.count(HOSTILE_PROMPT) == 1 and "sample_seed: 8" in text and "source_model" not in text.split(
        "sample_seed: 7")[1]
    assert not first.all("b") and not first.all("i") and not first.all("script")
    hover = [a["title"] for a in first.all("figure")]
    assert [float(re.search(r"CLIP score ([0-9.]+)", h)[1]) for h in hover] == pytest.approx(CLIP[:4])
    assert "PSNR (dB) 100.00" in hover[2]  # a null PSNR: identical images, counted as the run's mean counts them
    rejects = Page((root / "rejects.html").read_text())
    text = "".join(rejects.text)
    assert "cannot decode <svg onload=alert(4)>" in text and "bad</td><script>alert(3)</script>" in text
    assert not rejects.all("script") and not rejects.all("svg") and len(rejects.all("tr")) == 3


def test_a_shard_done_again_keeps_no_page_of_the_earlier_one(output):
    tmp_path, _ = output
    build(tmp_path, "s0", GalleryConfig(page_size=2, thumb_size=16))
    assert (tmp_path / "out" / "gallery" / "s0" / "page-3.html").exists()
    summary, _ = build(tmp_path, "s0", GalleryConfig(page_size=6, thumb_size=16), inputs=False)
    root = tmp_path / "out" / "gallery" / "s0"
    assert summary["pages"] == 1 and summary["paired"] is None
    assert sorted(p.name for p in root.glob("*.html") if not p.name.startswith("by-")) == ["index.html",
                                                                                          "rejects.html"]
    assert not list(root.glob("by-*-2.html")) and not list(root.glob("thumbs/*.in.webp"))  # no input column without input.uri
    assert [a["alt"] for a in Page((root / "index.html").read_text()).all("img")][:2] == ["output", "output"]


def test_a_shard_with_every_sample_rejected_lists_its_rejects(output):
    tmp_path, _ = output
    summary, keys = build(tmp_path, "s1", GalleryConfig())
    assert keys == [] and summary["samples"] == 0 and summary["rejects"] == {"job": 1}
    page = Page((tmp_path / "out" / "gallery" / "s1" / "index.html").read_text())
    assert not page.all("figure") and "no sample" in "".join(page.text)


def test_every_link_of_the_gallery_is_relative_and_resolves(output):
    tmp_path, _ = output
    store = OutputStore(str(tmp_path / "out"), {})
    shards = [build(tmp_path, s, GalleryConfig(page_size=4, thumb_size=24))[0] for s in ("s0", "s1")]
    write_index(store, "s3://bucket/out", shards + [{"shard": "s2", "missing": True}],
                {"job": "translate", "run_id": "r1", "nested": {"x": 1}}, per_page=2)
    pages = sorted((tmp_path / "out" / "gallery").rglob("*.html"))
    # index: 2 pages; s0: 2 pages in each of its 9 orders + rejects; s1: 1 page (no score: input order) + rejects
    assert len(pages) == 2 + 2 * 9 + 1 + 2
    for path in pages:
        for target in Page(path.read_text()).links():
            assert not target.startswith(("/", "http", "//")) and "://" not in target, (path, target)
            if target == "data:,":  # the empty favicon
                continue
            assert (path.parent / target.split("?")[0]).resolve().is_file(), (path, target)
    index = Page((tmp_path / "out" / "gallery" / "index.html").read_text())
    text = "".join(index.text)
    assert "s2" not in text and HOSTILE_PROMPT in text and "r1" in text  # s2's row: on page 2
    pager = ["index-2.html", "index-2.html"]  # page 2, next: above the table and below it
    assert [a["href"] for a in index.all("a")] == [*pager, "s0/index.html", "s0/rejects.html", "s1/index.html",
                                                   "s1/rejects.html", *pager]
    second = "".join(Page((tmp_path / "out" / "gallery" / "index-2.html").read_text()).text)
    assert "s2" in second and "not in the gallery yet" in second and HOSTILE_PROMPT not in second


def test_each_score_orders_the_whole_shard_across_its_pages(output):
    tmp_path, _ = output
    summary, _ = build(tmp_path, "s0", GalleryConfig(page_size=2, thumb_size=16))
    root = tmp_path / "out" / "gallery" / "s0"

    def pages(stem: str) -> list[Page]:
        return [Page((root / page_file(k, stem)).read_text()) for k in range(1, summary["pages"] + 1)]

    def order(stem: str) -> list[list[int]]:  # the samples (their index in the shard) of each page of an order
        return [[int(f["data-i"]) for f in page.all("figure")] for page in pages(stem)]

    # CLIP score by index: 0.20 0.35 0.10 0.30 0.25, sample 5 unscored; in input order 2 a page: [0 1] [2 3] [4 5]
    assert order("page") == [[0, 1], [2, 3], [4, 5]]
    assert order("by-clip_score-asc") == [[2, 0], [4, 3], [1, 5]]  # the shard's lowest first, from pages 1 and 2
    assert order("by-clip_score-desc") == [[1, 3], [4, 0], [2, 5]]  # the unscored last in either direction
    assert order("by-directional-asc") == order("by-clip_score-asc")  # directional: CLIP score / 2
    assert order("by-psnr-asc") == [[0, 1], [3, 4], [5, 2]]  # 20 + index; sample 2's null PSNR is 100 dB
    assert order("by-ssim-desc") == order("page")  # SSIM 0.5 for all: equal values in input order
    first = pages("by-clip_score-asc")[0]
    assert "samples 1–2 of 6 by CLIP score, lowest first · page 1 of 3" in "".join(first.text)
    # the same thumbnails as the input order's pages: only the HTML is written again
    srcs = {stem: sorted(a["src"] for p in pages(stem) for a in p.all("img")) for stem in summary["orders"]}
    assert all(v == srcs["page"] for v in srcs.values()) and len(list(root.glob("thumbs/*"))) == len(srcs["page"])
    # every page links to the first page of each order, its own as text, and pages within its own order
    for stem in summary["orders"]:
        for k, page in enumerate(pages(stem), start=1):
            menu = [a["href"] for a in page.all("a") if a.get("class") == "order-link"]
            assert menu == [page_file(1, o) for o in summary["orders"] if o != stem]
            pager = {a["href"] for a in page.all("a") if a.get("class") == "page-link"}
            assert pager == {page_file(n, stem) for n in range(1, 4) if n != k}
            for target in menu + sorted(pager):
                assert (root / target).is_file() and "/" not in target


def test_an_order_puts_equal_values_in_input_order_and_the_unmeasured_last():
    values = [0.5, None, 0.1, float("nan"), 0.5, 0.1]
    cards = [Card(i, f"k{i}", [], scores={} if v is None else {"clip_score": v}) for i, v in enumerate(values)]
    assert [o.stem for o in orders(["clip_score"])] == ["page", "by-clip_score-asc", "by-clip_score-desc"]
    lowest, highest = orders(["clip_score"])[1:]
    assert [c.index for c in in_order(cards, lowest)] == [2, 5, 0, 4, 1, 3]
    assert [c.index for c in in_order(cards, highest)] == [0, 4, 2, 5, 1, 3]
    assert [c.index for c in in_order(cards[::-1], INPUT_ORDER)] == list(range(6))


def test_the_index_is_paged_with_links_between_its_pages(tmp_path):
    store = OutputStore(str(tmp_path / "out"), {})
    root = tmp_path / "out" / "gallery"
    shards = [{"shard": f"s{i}", "samples": 1} for i in range(4)] + [{"shard": "index-2.html", "samples": 1}]
    assert write_index(store, "out", shards, {"run_id": "r1"}, per_page=2) == str(root / "index.html")
    names = ["index.html", "index-2.html", "index-3.html"]
    assert sorted(p.name for p in root.glob("*")) == sorted(names)
    pages = [Page((root / n).read_text()) for n in names]
    rows = [[a["href"] for a in p.all("a") if "class" not in a] for p in pages]
    folder = shard_folder("index-2.html")  # a shard named as an index page gets a folder of another name
    assert folder.startswith("shard-") and rows == [["s0/index.html", "s1/index.html"],
                                                    ["s2/index.html", "s3/index.html"], [f"{folder}/index.html"]]
    assert [[(a.get("rel"), a["href"]) for a in p.all("a") if a.get("rel")] for p in pages] == [
        [("next", "index-2.html")] * 2,
        [("prev", "index.html"), ("next", "index-3.html")] * 2,
        [("prev", "index-2.html")] * 2]
    text = ["".join(p.text) for p in pages]
    assert all("5 shard(s), 5 sample(s)" in t for t in text) and "shards 3–4 of 5 · page 2 of 3" in text[1]
    assert "r1" in text[0] and "r1" not in text[1]  # the latest run: on the first page
    for p in pages:
        assert all((root / a["href"]).is_file() for a in p.all("a") if a.get("class") == "page-link")
    # fewer shards: the pages of the longer index are gone
    write_index(store, "out", shards[:3], None, per_page=2)
    assert sorted(p.name for p in root.glob("*")) == ["index-2.html", "index.html"]
    write_index(store, "out", shards[:1], None, per_page=2)
    assert [p.name for p in root.glob("*")] == ["index.html"]
    assert not Page((root / "index.html").read_text()).all("nav")


def test_the_gallery_section_and_output_gallery():
    cfg = validate({"output": {"gallery": True}, "gallery": {"page_size": 50}})
    assert cfg.output.gallery and cfg.gallery.page_size == 50 and cfg.gallery.thumb_size == 256
    assert not validate({}).output.gallery
    with pytest.raises(ConfigError, match="gallery.page_size"):
        validate({"gallery": {"page_size": 0}})
    with pytest.raises(ConfigError, match="gallery.thumbs"):
        validate({"gallery": {"thumbs": 1}})


def test_the_image_jobs_run_the_gallery_after_their_run_record_over_their_own_output():
    from pipeline.jobs import JOBS
    from pipeline.jobs.gallery import AFTER_RUN, JOB, after_run_config

    with_gallery = {name for name, job in JOBS.items() if AFTER_RUN in job.subruns}
    assert with_gallery == {"translate", "edit", "search", "guide", "ood-sample"}
    assert AFTER_RUN.job is JOB and AFTER_RUN.after == "record" and not AFTER_RUN.redo and AFTER_RUN.folder == ""
    assert after_run_config(None, validate({"output": {"uri": "/nowhere"}})) is None  # output.gallery off


def test_output_gallery_needs_a_committed_shard(tmp_path):
    from pipeline.jobs.gallery import after_run_config

    cfg = validate({"output": {"uri": str(tmp_path / "out"), "gallery": True}})
    assert after_run_config(None, cfg) is None  # nothing committed: nothing to show
    local_put(str(tmp_path / "out" / "_ledger" / "a.json"), b"{}")
    assert after_run_config(None, cfg) is cfg


def test_a_thumbnail_of_an_undecodable_image_is_a_note(output):
    tmp_path, _ = output
    from shard_builders import tar_bytes

    local_put(str(tmp_path / "out" / "images" / "s0.tar"), tar_bytes([("k", {"png": b"not a png"}),
                                                                      ("e", {"png": b"", "txt": b"t"})]))
    summary, keys = build(tmp_path, "s0", GalleryConfig(), inputs=False)
    page = Page((tmp_path / "out" / "gallery" / "s0" / "index.html").read_text())
    assert keys == ["k", "e"] and not page.all("img")
    text = "".join(page.text)
    assert "empty image member" in text and re.search(r"cannot|not a|unidentified|decode", text, re.I)
