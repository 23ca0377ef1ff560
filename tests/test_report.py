"""Tests for jaxcap.report: escaping, embedding, and a real render in headless Chromium."""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from jaxcap import metrics, report

_INSTALL_HINT = (
    'chromium is needed to render the HTML report; install it with '
    '`apt-get update && apt-get install -y chromium` (Debian; .ci/run does this).'
)
_EVIL = '<script>alert("x")</script>'
# Pure colours that the random images and the page's own palette never produce, so finding
# them in the screenshot proves that the embedded image and the linked heatmap were drawn.
_PHOTO_MARK = (0, 255, 0)
_HEATMAP_MARK = (255, 0, 255)

SCORES = {
    'greedy': {'Bleu_1': 0.8321, 'Bleu_4': 0.5348, 'METEOR': 0.4376, 'CIDEr': 3.4408},
    'beam3': {'Bleu_1': 0.8402, 'Bleu_4': 0.5611, 'METEOR': 0.4401, 'CIDEr': 3.5120,
              'custom': 1.0},
}


def _photo(seed: int, size: tuple[int, int] = (120, 160)) -> np.ndarray:
    image = np.random.default_rng(seed).integers(0, 200, (*size, 3), dtype=np.uint8)
    image[10:60, 10:60] = _PHOTO_MARK  # a solid block: survives thumbnailing unchanged
    return image


def _entries(tmp_path):
    heat_dir = tmp_path / 'heatmaps'
    heat_dir.mkdir()
    inside = heat_dir / 'val #1.png'  # a name that must be percent-encoded in a URL
    Image.new('RGB', (300, 120), _HEATMAP_MARK).save(inside)
    outside = tmp_path.parent / f'{tmp_path.name}_outside.png'
    Image.new('RGB', (40, 40), (10, 20, 30)).save(outside)
    return [
        {'image_id': 17, 'image': _photo(0), 'references': ['a cat on a mat', 'a cat sits'],
         'captions': {'greedy': 'a cat on a mat', 'beam3': 'a cat sitting on a mat'},
         'heatmap': str(inside)},
        {'image_id': '<b>id</b>', 'image': _photo(1, (700, 500)),
         'references': ['café noir près du 猫 🐈', _EVIL],
         'captions': {'greedy': _EVIL, 'beam3': 'Ünïcödé & “quotes” \'single\''},
         'heatmap': str(outside)},
        {'image_id': 3, 'image': None, 'references': ['x'], 'captions': {'greedy': ''}},
    ]


def test_html_escapes_and_embeds(tmp_path):
    path = str(tmp_path / 'report.html')
    assert report.write_report(path, 'val <report>', SCORES, _entries(tmp_path)) == path
    page = open(path, encoding='utf-8').read()
    # Data is text, never markup.
    assert '<script>' not in page and '<b>id</b>' not in page
    assert page.count('&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;') == 2
    assert 'image &lt;b&gt;id&lt;/b&gt;' in page and '<title>val &lt;report&gt;</title>' in page
    assert 'café noir près du 猫 🐈' in page and 'Ünïcödé &amp; “quotes” &#x27;single&#x27;' in page
    # Two photos embedded; the third entry has none; the empty caption is marked.
    assert len(re.findall(r'class="photo" alt="[^"]*" src="data:image/png;base64,', page)) == 2
    assert 'no image' in page and '(empty caption)' in page
    # The heatmap under the report's directory is linked (percent-encoded), the other embedded.
    assert 'class="heatmap" alt="attention heatmap 17" src="heatmaps/val%20%231.png"' in page
    assert re.search(r'class="heatmap" alt="[^"]*" src="data:image/png;base64,', page)
    # Metrics: coco-caption's order first, then the rest; missing values shown as a dash.
    header = re.search(r'<thead>(.*?)</thead>', page).group(1)
    assert re.findall(r'<th>([^<]*)</th>', header) == [
        'decoding', 'Bleu_1', 'Bleu_4', 'METEOR', 'CIDEr', 'custom']
    assert '<td class="best">3.5120</td>' in page and '<td>3.4408</td>' in page
    assert '<td>&ndash;</td>' in page
    assert metrics.UNAVAILABLE_METRICS['SPICE'] in page


def test_large_images_are_shrunk(tmp_path):
    entry = {'image_id': 1, 'image': _photo(2, (900, 1200)), 'references': ['a'],
             'captions': {'greedy': 'a'}}
    page = report.render_report('t', SCORES, [entry])
    size_kib = len(page.encode()) / 1024
    # A 1200x900 random-noise PNG is ~3 MiB; at 320x240 it is ~200 KiB.
    assert size_kib < 400, size_kib


@pytest.mark.parametrize(
    ('entry', 'error', 'pattern'),
    [
        ({'image': np.zeros((4, 4), np.uint8)}, ValueError, 'HxWx3 uint8'),
        ({'image': np.zeros((4, 4, 3), np.float32)}, ValueError, 'HxWx3 uint8'),
        ({'heatmap': '/nonexistent/heat.png'}, FileNotFoundError, 'nonexistent'),
    ],
)
def test_bad_entries_raise_before_writing(tmp_path, entry, error, pattern):
    base = {'image_id': 1, 'image': None, 'references': ['a'], 'captions': {'greedy': 'a'}}
    path = tmp_path / 'out' / 'report.html'
    with pytest.raises(error, match=pattern):
        report.write_report(str(path), 't', SCORES, [{**base, **entry}])
    assert not path.exists()


def _screenshot(html_path: str, png_path: str, profile_dir: str) -> None:
    chromium = shutil.which('chromium')
    if chromium is None:
        pytest.fail(_INSTALL_HINT)
    cmd = [chromium, '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
           '--no-first-run', '--disable-background-networking', '--disable-component-update',
           '--disable-sync', f'--user-data-dir={profile_dir}', '--window-size=1200,900',
           f'--screenshot={png_path}', f'file://{html_path}']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0 and os.path.exists(png_path), proc.stderr[-2000:]


def test_renders_in_headless_chromium(tmp_path):
    html_path = str(tmp_path / 'report.html')
    report.write_report(html_path, 'jaxcap val report', SCORES, _entries(tmp_path))
    png_path = str(tmp_path / 'shot.png')
    _screenshot(html_path, png_path, str(tmp_path / 'profile'))

    shot = np.asarray(Image.open(png_path).convert('RGB'))
    assert shot.shape[:2] == (900, 1200)
    colours, counts = np.unique(shot.reshape(-1, 3), axis=0, return_counts=True)
    assert len(colours) > 100, f'only {len(colours)} colours: a blank page?'
    assert counts.max() < 0.9 * counts.sum(), 'one colour covers 90% of the page'
    # The embedded photo (data URI) and the relatively linked heatmap (a file:// URL that the
    # page's Content Security Policy must allow) both reached the screen.
    photo_pixels = int(np.all(shot == _PHOTO_MARK, axis=-1).sum())
    heatmap_pixels = int(np.all(shot == _HEATMAP_MARK, axis=-1).sum())
    assert photo_pixels > 1000, f'embedded photo not drawn ({photo_pixels} marker pixels)'
    assert heatmap_pixels > 10_000, f'linked heatmap not drawn ({heatmap_pixels} marker pixels)'


def test_missing_chromium_fails_with_install_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, 'which', lambda name: None)
    with pytest.raises(pytest.fail.Exception, match='apt-get install -y chromium'):
        _screenshot(str(tmp_path / 'r.html'), str(tmp_path / 's.png'), str(tmp_path / 'p'))
