"""A self-contained HTML evaluation report: a metrics table and one card per image.

The page is a single file: images are embedded as base64 PNG data URIs, the
CSS is inline and there is no JavaScript. Heatmap PNGs that live under the
report's directory are linked relatively (they are already on disk next to it,
often large, and the directory travels as a whole); any other heatmap is
embedded so the page never points outside its directory.

Every caption, reference, id and name comes from data (a model can generate
``<script>``), so all text is escaped with ``html.escape``; a Content Security
Policy that forbids scripts is the second line of defence.
"""

from __future__ import annotations

import base64
import html
import io
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from jaxcap import metrics

_THUMB_MAX_SIDE = 320  # cards show small images; full-size photos only bloat the file
_CSP = "default-src 'none'; img-src 'self' data: file:; style-src 'unsafe-inline'"
_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 24px; color: #1d2330; background: #f4f5f8; }
h1 { font-size: 24px; margin: 0 0 16px; }
table.scores { border-collapse: collapse; background: #fff; margin-bottom: 8px; }
table.scores th, table.scores td { border: 1px solid #d0d4dc; padding: 6px 12px;
                                   text-align: right; }
table.scores th:first-child, table.scores td:first-child { text-align: left; }
table.scores thead th { background: #2f4b7c; color: #fff; }
td.best { font-weight: 700; background: #e3f1e3; }
p.note { color: #5b6170; font-size: 13px; margin: 4px 0 20px; }
.cards { display: flex; flex-wrap: wrap; gap: 16px; }
.card { background: #fff; border: 1px solid #d0d4dc; border-radius: 8px; padding: 14px;
        display: flex; flex-wrap: wrap; gap: 14px; width: 100%; box-sizing: border-box; }
.card h2 { font-size: 16px; margin: 0 0 8px; width: 100%; }
.card img.photo { max-width: 320px; border-radius: 4px; align-self: flex-start; }
.card .noimage { width: 160px; height: 120px; background: #e6e8ee; color: #5b6170;
                 display: flex; align-items: center; justify-content: center; }
.card .text { flex: 1; min-width: 280px; }
.card dl { margin: 0 0 10px; }
.card dt { font-weight: 600; color: #2f4b7c; }
.card dd { margin: 0 0 6px 12px; }
.card dd.empty { color: #8a90a0; font-style: italic; }
.card ol { margin: 0; padding-left: 22px; }
.card img.heatmap { max-width: 100%; align-self: flex-start; }
"""


def _png_data_uri(png: bytes) -> str:
    return 'data:image/png;base64,' + base64.b64encode(png).decode('ascii')


def _image_data_uri(image: np.ndarray) -> str:
    """A PNG data URI of an HxWx3 uint8 image, shrunk to at most _THUMB_MAX_SIDE."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 \
            or image.dtype != np.uint8:
        shape = getattr(image, 'shape', None)
        dtype = getattr(image, 'dtype', type(image).__name__)
        raise ValueError(f'Expected an HxWx3 uint8 image, got shape {shape} dtype {dtype}.')
    pil = Image.fromarray(image)
    pil.thumbnail((_THUMB_MAX_SIDE, _THUMB_MAX_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    pil.save(buffer, format='PNG')
    return _png_data_uri(buffer.getvalue())


def _heatmap_src(heatmap: str, report_dir: str) -> str:
    """A relative URL for a PNG under the report's directory, otherwise a data URI."""
    if not os.path.isfile(heatmap):
        raise FileNotFoundError(f'Heatmap {heatmap!r} does not exist.')
    relative = os.path.relpath(os.path.abspath(heatmap), report_dir)
    if not relative.startswith(os.pardir + os.sep) and relative != os.pardir:
        # A URL, not a file path: '#', '?', '%' or spaces in a name must be percent-encoded.
        return '/'.join(urllib.parse.quote(part) for part in relative.split(os.sep))
    with open(heatmap, 'rb') as f:
        return _png_data_uri(f.read())


def _metric_columns(scores: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The official metrics in coco-caption's order, then any others as first seen."""
    seen = dict.fromkeys(name for values in scores.values() for name in values)
    official = [name for name in metrics.METRIC_NAMES if name in seen]
    return official + [name for name in seen if name not in official]


def _scores_table(scores: Mapping[str, Mapping[str, float]]) -> str:
    columns = _metric_columns(scores)
    best = {c: max((v[c] for v in scores.values() if c in v), default=None) for c in columns}
    head = ''.join(f'<th>{html.escape(c)}</th>' for c in columns)
    rows = []
    for decoding, values in scores.items():
        cells = []
        for c in columns:
            if c not in values:
                cells.append('<td>&ndash;</td>')
                continue
            # Bold the best decoding per metric, when there is something to compare.
            cls = ' class="best"' if len(scores) > 1 and values[c] == best[c] else ''
            cells.append(f'<td{cls}>{float(values[c]):.4f}</td>')
        rows.append(f'<tr><td>{html.escape(str(decoding))}</td>{"".join(cells)}</tr>')
    return (f'<table class="scores"><thead><tr><th>decoding</th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _unavailable_note() -> str:
    notes = [f'{html.escape(name)}: {html.escape(why)}.'
             for name, why in metrics.UNAVAILABLE_METRICS.items()]
    return f'<p class="note">{" ".join(notes)}</p>' if notes else ''


def _card(entry: Mapping[str, Any], report_dir: str) -> str:
    image_id = html.escape(str(entry['image_id']))
    image = entry.get('image')
    if image is None:
        picture = '<div class="noimage">no image</div>'
    else:
        picture = f'<img class="photo" alt="image {image_id}" src="{_image_data_uri(image)}">'
    captions = []
    for decoding, caption in entry['captions'].items():
        name = html.escape(str(decoding))
        if caption.strip():
            captions.append(f'<dt>{name}</dt><dd>{html.escape(caption)}</dd>')
        else:
            captions.append(f'<dt>{name}</dt><dd class="empty">(empty caption)</dd>')
    references = ''.join(f'<li>{html.escape(r)}</li>' for r in entry['references'])
    heatmap = ''
    if entry.get('heatmap'):
        src = html.escape(_heatmap_src(entry['heatmap'], report_dir))
        heatmap = f'<img class="heatmap" alt="attention heatmap {image_id}" src="{src}">'
    return (f'<section class="card"><h2>image {image_id}</h2>{picture}'
            f'<div class="text"><dl>{"".join(captions)}</dl>'
            f'<div><b>references</b><ol>{references}</ol></div></div>{heatmap}</section>')


def render_report(title: str, scores: Mapping[str, Mapping[str, float]],
                  entries: Sequence[Mapping[str, Any]], report_dir: str = '.') -> str:
    """The report's HTML; see :func:`write_report`. Heatmaps resolve against ``report_dir``."""
    report_dir = os.path.abspath(report_dir)
    cards = ''.join(_card(entry, report_dir) for entry in entries)
    title = html.escape(title)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{title}</title><style>{_CSS}</style></head>\n<body>'
        f'<h1>{title}</h1>{_scores_table(scores)}{_unavailable_note()}'
        f'<div class="cards">{cards}</div></body></html>\n'
    )


def write_report(path: str, title: str, scores: Mapping[str, Mapping[str, float]],
                 entries: Sequence[Mapping[str, Any]]) -> str:
    """Writes a self-contained HTML evaluation report.

    Args:
        path: The .html file to write; its directory is created if needed.
        title: Page title and heading.
        scores: Decoding name (e.g. 'greedy', 'beam3') -> metric name -> value.
            The table shows the official metrics in coco-caption's order, then
            any others; the best value per metric is highlighted.
        entries: One card each, in order. Keys: 'image_id'; 'image' (HxWx3
            uint8 array, or None); 'references' (list of str); 'captions'
            (decoding name -> caption); optionally 'heatmap' (path of a PNG,
            absolute or relative to the working directory; linked relatively
            when it lies under the report's directory, embedded otherwise).

    Returns:
        ``path``.

    Raises:
        ValueError: If an image is not HxWx3 uint8.
        FileNotFoundError: If a heatmap file is missing.
        KeyError: If an entry lacks a required key.
    """
    report_dir = os.path.dirname(os.path.abspath(path))
    page = render_report(title, scores, entries, report_dir)  # before touching the disk
    os.makedirs(report_dir, exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
        f.write(page)
    return path
