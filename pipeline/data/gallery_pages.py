"""The gallery's pages (`latentshift gallery`, docs/gallery.md): static HTML, relative links only, every
value that comes from the data escaped, no script.

  index.html, index-<k>.html          the run: its settings, one row per shard (samples, rejects, means),
                                      ``INDEX_ROWS`` shards a page
  <shard>/index.html, page-<k>.html   a grid of samples in input order: input | output | further images,
                                      with key and scores (hover), provenance and carried text (click)
  <shard>/by-<score>-asc.html, by-<score>-asc-<k>.html, by-<score>-desc…
                                      the same samples, the whole shard in the order of one of its scores
                                      (lowest or highest first; ``orders``, ``in_order``): only the HTML is
                                      written again, the pages show the same thumbnails
  <shard>/rejects.html, rejects-<k>.html   the shard's rejects and their reasons
  <shard>/thumbs/…webp                the thumbnails (pipeline/data/gallery.py writes them)

Escaping: text and attribute values go through ``html.escape``; file names are the module's own (a score's
name from ``SCORES``, a page number), never the data's. Links are relative, each path segment
percent-encoded (``link``), so the pages work from a local folder, from an object-store prefix served as a
static site, and under ``python -m http.server``; nothing is loaded from elsewhere.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import re
from dataclasses import dataclass, field
from urllib.parse import quote

# the measures a sample may have, in the order the pages show them; each orders a shard's pages
SCORES = ("clip_score", "directional", "psnr", "ssim")
LABELS = {"clip_score": "CLIP score", "directional": "directional CLIP", "psnr": "PSNR (dB)", "ssim": "SSIM"}
PAGER_REACH = 4  # a pager links the first, the last and this many pages either side of the current one
INDEX_ROWS = 200  # shards a page of the gallery's index lists (a row is about 400 bytes)
RESERVED = ("", ".", "..")  # shard names that cannot name a folder; and the index's pages, INDEX_FILE
INDEX_FILE = re.compile(r"index(-[0-9]+)?\.html")


@dataclass
class Picture:
    """One image of a sample as a page shows it."""

    label: str  # "input", "output", "scale1" …: the tar member it shows, less its image extension
    src: str = ""  # its thumbnail, relative to the page ("": none, see ``note``)
    width: int = 0
    height: int = 0
    note: str = ""  # why there is no thumbnail ("not in input shard …", "cannot decode …")


@dataclass
class Card:
    """One sample of a shard's grid."""

    index: int  # its position in the shard (the input order)
    key: str
    pictures: list[Picture]
    scores: dict[str, float] = field(default_factory=dict)  # of SCORES, the measured ones
    # its latentshift.json, parsed, less the settings every sample of the page shares (``grid_page``'s
    # ``settings``, shown once); its text when it is not JSON
    provenance: object = None
    texts: dict[str, str] = field(default_factory=dict)  # carried text members by extension, cut


def esc(value: object) -> str:
    """Text or an attribute value, escaped (quotes too)."""
    return html.escape(str(value), quote=True)


def link(*parts: str) -> str:
    """A relative URL from path segments, each percent-encoded (``a b#1`` → ``a%20b%231``): it has no
    scheme and no leading ``/`` whatever the segments hold. ``..`` stays the parent folder."""
    return "/".join(p if p == ".." else quote(p, safe="") for p in parts)


def shard_folder(shard: str) -> str:
    """The shard's folder under gallery/: its name, or, for a name that cannot be one (``..``, or the
    name of one of the index's pages, ``index.html``, ``index-2.html`` …), a name derived from it."""
    if shard not in RESERVED and not INDEX_FILE.fullmatch(shard):
        return shard
    return "shard-" + hashlib.sha256(shard.encode()).hexdigest()[:12]


def page_file(page: int, stem: str = "page") -> str:
    """A shard's grid page ``page`` (from 1): its first is index.html, so the shard's folder opens on it;
    the others page-<k>.html. Other stems: <stem>.html, <stem>-<k>.html (the reject pages, rejects.html …;
    a score's order, by-clip_score-asc.html …; the gallery's index, index.html, index-2.html …)."""
    if page == 1:
        return "index.html" if stem == "page" else f"{stem}.html"
    return f"{stem}-{page}.html"


def page_count(items: int, page_size: int) -> int:
    return max(1, -(-items // page_size))


def number(name: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.2f}" if name == "psnr" else f"{value:.4f}"


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:.2em 0}h2{font-size:1.1em}
code,pre{font:12px/1.3 ui-monospace,monospace}pre{white-space:pre-wrap;word-break:break-all;max-height:24em;
overflow:auto;background:#f0f0f0;padding:.4em;margin:.2em 0}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:.2em .5em;text-align:left;vertical-align:top}
td.n{text-align:right}
.grid{display:flex;flex-wrap:wrap;gap:10px}
.card{margin:0;background:#fff;border:1px solid #ddd;padding:6px;max-width:100%}
.card figcaption{width:0;min-width:100%;min-width:max(100%,12em)}.scores{display:block}
.pics{display:flex;gap:4px;flex-wrap:wrap}.pic{display:flex;flex-direction:column;align-items:center}
.pic span{font-size:11px;color:#666}.pic img{image-rendering:auto;max-width:256px;height:auto}
.missing{width:96px;height:96px;display:flex;align-items:center;justify-content:center;text-align:center;
font-size:11px;color:#a00;background:#f4f4f4;overflow:hidden}
.key{word-break:break-all}.scores{color:#555}nav{margin:.6em 0}nav a,nav strong{margin-right:.4em}
"""


def _document(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<link rel=\"icon\" href=\"data:,\">"  # no favicon request (a 404 in a served folder's log)
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def _pager(current: int, total: int, stem: str) -> str:
    """Links to the previous and the next page and to the pages around ``current``: a page holds at most
    2·PAGER_REACH + 4 of them, however many pages there are."""
    if total == 1:
        return ""
    shown = sorted({1, total, *range(max(1, current - PAGER_REACH), min(total, current + PAGER_REACH) + 1)})
    out, last = [], 0
    if current > 1:
        out.append(f'<a class="page-link" rel="prev" href="{page_file(current - 1, stem)}">‹ prev</a>')
    for k in shown:
        if k > last + 1:
            out.append("<span>…</span>")
        out.append(f"<strong>{k}</strong>" if k == current else f'<a class="page-link" href="{page_file(k, stem)}">{k}</a>')
        last = k
    if current < total:
        out.append(f'<a class="page-link" rel="next" href="{page_file(current + 1, stem)}">next ›</a>')
    return f"<nav>page {' '.join(out)}</nav>"


# ---- a shard's grid ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Order:
    """One order of a shard's samples, written as its own set of pages: ``stem`` names their files
    (``page_file``), ``score`` the measure it sorts by (None: the input order)."""

    stem: str
    label: str
    score: str | None = None
    ascending: bool = True


INPUT_ORDER = Order("page", "input order")


def orders(scores: list[str]) -> list[Order]:
    """The orders of a shard that has ``scores`` (of SCORES): input order, then each score lowest first
    (the worst samples of the whole shard on the first page) and highest first."""
    out = [INPUT_ORDER]
    for s in scores:
        out += [Order(f"by-{s}-asc", f"{LABELS[s]}, lowest first", s, True),
                Order(f"by-{s}-desc", f"{LABELS[s]}, highest first", s, False)]
    return out


def measured(card: Card, score: str) -> float | None:
    """The card's value of ``score``, None where it has none (or NaN, ±inf: not a value to order by)."""
    value = card.scores.get(score)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def shard_scores(cards: list[Card]) -> list[str]:
    """The SCORES at least one of ``cards`` has a value of, in SCORES' order."""
    return [s for s in SCORES if any(measured(c, s) is not None for c in cards)]


def in_order(cards: list[Card], order: Order) -> list[Card]:
    """``cards`` (a shard's, in input order) in ``order``: by its score, lowest or highest first, equal
    values in input order; the cards without that score last, in input order."""
    if order.score is None:
        return sorted(cards, key=lambda c: c.index)
    sign = 1 if order.ascending else -1
    scored = [c for c in cards if measured(c, order.score) is not None]
    scored.sort(key=lambda c: (sign * measured(c, order.score), c.index))
    return scored + sorted((c for c in cards if measured(c, order.score) is None), key=lambda c: c.index)


def _order_menu(current: Order, scores: list[str]) -> str:
    """Links to the first page of each of the shard's orders; the current one is plain text."""
    def one(o: Order, text: str) -> str:
        return f"<strong>{esc(text)}</strong>" if o == current else \
            f'<a class="order-link" href="{page_file(1, o.stem)}">{esc(text)}</a>'

    all_orders = orders(scores)
    parts = [one(all_orders[0], all_orders[0].label)]
    for asc, desc in zip(all_orders[1::2], all_orders[2::2], strict=True):
        parts.append(f"{esc(LABELS[asc.score])}: {one(asc, 'lowest first')} {one(desc, 'highest first')}")
    return f'<nav class="orders">order: {" · ".join(parts)}</nav>'


def _picture(p: Picture) -> str:
    if p.src:
        inner = (f'<img src="{esc(p.src)}" alt="{esc(p.label)}" width="{int(p.width)}" height="{int(p.height)}" '
                 'loading="lazy">')
    else:
        inner = f'<div class="missing">{esc(p.note or "no image")}</div>'
    return f'<div class="pic">{inner}<span>{esc(p.label)}</span></div>'


def _card(c: Card) -> str:
    shown = [f"{LABELS[s]} {number(s, c.scores[s])}" for s in SCORES if s in c.scores]
    hover = "\n".join([f"key: {c.key}", f"index: {c.index}", *shown])
    more = []
    if c.provenance is not None:
        more.append(f"<details><summary>provenance</summary><pre>{esc(record_text(c.provenance))}</pre></details>")
    for ext, text in c.texts.items():
        more.append(f"<details><summary>{esc(ext)}</summary><pre>{esc(text)}</pre></details>")
    return (f'<figure class="card" data-i="{c.index}" title="{esc(hover)}">'
            f'<div class="pics">{"".join(_picture(p) for p in c.pictures)}</div>'
            f'<figcaption><code class="key">{esc(c.key)}</code> <span class="scores">{esc(" · ".join(shown))}</span>'
            f'{"".join(more)}</figcaption></figure>')


def record_text(record: object) -> str:
    """A provenance record as text: one line per key, its value as compact JSON (a long list of
    timesteps stays one line)."""
    if not isinstance(record, dict):
        return str(record)
    return "\n".join(f"{k}: {json.dumps(v, sort_keys=True, ensure_ascii=False, default=str)}"
                     for k, v in sorted(record.items()))


def grid_page(shard: str, cards: list[Card], page: int, pages: int, samples: int, rejects: int,
              settings: dict | None = None, *, scores: list[str] | None = None, order: Order = INPUT_ORDER,
              start: int | None = None) -> str:
    """One page of a shard's grid: ``cards`` (at most ``gallery.page_size``), the ``page``-th of ``pages``
    of the shard in ``order`` (its files: ``page_file(k, order.stem)``), ``start`` the position of its first
    card in that order (None: in input order, its index). ``scores``: the shard's scores (``shard_scores``
    of all its cards; None: of these), whose orders the page links to. ``settings``: what the provenance
    of every sample of the shard records alike (the run's settings), shown once at the top; each card
    shows the rest of its sample's record."""
    scores = shard_scores(cards) if scores is None else scores
    start = (cards[0].index if cards else 0) if start is None else start
    span = f"samples {start + 1}–{start + len(cards)} of {samples}" if cards else "no sample"
    if order.score is not None:
        span += f" by {esc(order.label)}"
    rejected = f' · <a href="{page_file(1, "rejects")}">{rejects} reject(s)</a>' if rejects else ""
    pager = _pager(page, pages, order.stem)
    body = (f'<header><a href="{link("..", "index.html")}">all shards</a>'
            f"<h1>shard <code>{esc(shard)}</code></h1>"
            f"<p>{span} · page {page} of {pages}{rejected}</p>"
            + (f"<details><summary>settings (every sample's provenance holds them)</summary>"
               f"<pre>{esc(record_text(settings))}</pre></details>" if settings else "") +
            f"{_order_menu(order, scores)}{pager}</header>\n"
            '<main id="grid" class="grid">\n' + "\n".join(_card(c) for c in cards) +
            f"\n</main>\n{pager}")
    title = f"{shard} · page {page}" + (f" · {order.label}" if order.score is not None else "")
    return _document(title, body)


# ---- a shard's rejects ---------------------------------------------------------------------------


def rejects_page(shard: str, lines: list[dict], page: int, pages: int, total: int) -> str:
    """One page of a shard's rejects: each line's source (the job, the score job, the gallery), key,
    member and reason."""
    rows = "".join(f"<tr><td>{esc(r.get('source', ''))}</td><td class=\"n\">{esc(r.get('index', ''))}</td>"
                   f"<td><code>{esc(r.get('key', ''))}</code></td><td><code>{esc(r.get('member', ''))}</code></td>"
                   f"<td>{esc(r.get('reason', ''))}</td></tr>" for r in lines)
    pager = _pager(page, pages, "rejects")
    body = (f'<header><a href="{link("..", "index.html")}">all shards</a> · '
            f'<a href="{page_file(1)}">the shard\'s samples</a>'
            f"<h1>rejects of shard <code>{esc(shard)}</code></h1><p>{total} line(s) · page {page} of {pages}</p>"
            f"{pager}</header>\n<table><tr><th>from</th><th>index</th><th>key</th><th>member</th><th>reason</th></tr>"
            f"{rows}</table>\n{pager}")
    return _document(f"{shard} · rejects {page}", body)


# ---- the run's index -----------------------------------------------------------------------------


def _value_cell(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return f"<td><code>{esc(text)}</code></td>"


def _table(record: dict) -> str:
    return "<table>" + "".join(f"<tr><th>{esc(k)}</th>{_value_cell(v)}</tr>" for k, v in sorted(record.items())) + \
        "</table>"


def index_page(output: str, shards: list[dict], settings: dict | None, settings_from: str,
               run_record: dict | None, page: int = 1, per_page: int = INDEX_ROWS) -> str:
    """Page ``page`` of the gallery's index (``page_file(page, "index")``: index.html, index-2.html …):
    the rows of ``per_page`` of ``shards``, the counts of all of them, links to the pages around it.
    ``shards``: one summary per shard (``pipeline/data/gallery.py`` ``build_shard``); one with
    ``"missing": True`` is a committed shard the gallery has not shown yet. ``settings``: the run's
    settings as a sample's provenance records them (``settings_from`` names the sample); ``run_record``:
    the latest run record of the output; both on the first page only."""
    pages = page_count(len(shards), per_page)
    chunk = shards[(page - 1) * per_page: page * per_page]
    rows = []
    for s in chunk:
        name = s["shard"]
        if s.get("missing"):
            rows.append(f"<tr><td><code>{esc(name)}</code></td><td colspan=\"6\">not in the gallery yet: "
                        "run <code>latentshift gallery</code></td></tr>")
            continue
        folder = s.get("folder") or shard_folder(name)
        rejected = sum(s.get("rejects", {}).values()) + s.get("problems", 0)
        rejects = (f'<a href="{link(folder, page_file(1, "rejects"))}">{rejected}</a>' if rejected else "0")
        rows.append(f'<tr><td><a href="{link(folder, page_file(1))}"><code>{esc(name)}</code></a></td>'
                    f'<td class="n">{int(s.get("samples", 0))}</td><td class="n">{int(s.get("pages", 1))}</td>'
                    f'<td class="n">{rejects}</td>'
                    f'<td class="n">{number("clip_score", s.get("mean_clip_score"))}</td>'
                    f'<td class="n">{number("directional", s.get("mean_directional"))}</td>'
                    f'<td class="n">{int(s.get("scored", 0))}</td></tr>')
    shown = [s for s in shards if not s.get("missing")]
    total = sum(int(s.get("samples", 0)) for s in shown)
    first = (page - 1) * per_page
    listed = f"shards {first + 1}–{first + len(chunk)} of {len(shards)} · page {page} of {pages}" if pages > 1 else ""
    pager = _pager(page, pages, "index")
    body = [f"<h1>gallery of <code>{esc(output)}</code></h1>",
            f"<p>{len(shown)} shard(s), {total} sample(s)"
            + (f"; {len(shards) - len(shown)} shard(s) not shown yet" if len(shown) < len(shards) else "") + "</p>",
            f"<h2>shards</h2>{f'<p>{listed}</p>' if listed else ''}{pager}"
            "<table><tr><th>shard</th><th>samples</th><th>pages</th><th>rejects</th>"
            "<th>mean CLIP score</th><th>mean directional CLIP</th><th>scored</th></tr>" + "".join(rows) + "</table>"
            + pager]
    if page == 1 and settings:
        body.append(f"<h2>settings</h2><p>as the provenance of <code>{esc(settings_from)}</code> records them</p>"
                    + _table(settings))
    if page == 1 and run_record:
        body.append("<h2>latest run</h2>" + _table({k: v for k, v in run_record.items() if not isinstance(v, dict)}))
    return _document(f"gallery of {output}" + (f" · page {page}" if page > 1 else ""), "\n".join(body))
