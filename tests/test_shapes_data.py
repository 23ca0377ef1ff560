"""Tests for the synthetic `shapes_captions` data set (jaxcap.data.shapes).

Expected values come from the rendered pixels, hand-made scenes or small
independent parsers written here, never from the module's own helpers.
"""

from __future__ import annotations

import itertools
import os
import re

import numpy as np
import pytest

from jaxcap.data import shapes

SPLITS = ('train', 'val', 'test')
TINY = dict(image_size=48, num_train=12, num_val=4, num_test=4)
COUNT_WORDS = {2: 'two', 3: 'three'}
RELATION_WORDS = {
    'to the left of': 'left', 'left of': 'left',
    'to the right of': 'right', 'right of': 'right',
    'above': 'above', 'over': 'above', 'below': 'below', 'under': 'below',
}
CAPTION_CHARS = re.compile(r'^[a-z0-9]+( [a-z0-9]+)*$')


# --------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------


def _records(builder, split: str) -> list[dict]:
    """All records of a split, ordered by image_id (file order is shuffled)."""
    source = builder.as_data_source(split)
    records = [source[i] for i in range(len(source))]
    return sorted(records, key=lambda r: int(r['image_id']))


def _obj(shape: str, color: str, size: str,
         box: tuple[int, int, int, int]) -> dict:
    return {'shape': shape, 'color': color, 'size': size, 'box_px': box}


def _captions(objects: list[dict], seed: int = 0) -> list[str]:
    return shapes.describe_scene(objects, np.random.default_rng(seed), 64)


def _colour_box(image: np.ndarray, color: str,
                box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Tight box of the pixels of exactly `color` inside `box` (inclusive)."""
    top, left, bottom, right = box
    crop = image[top:bottom + 1, left:right + 1]
    hit = np.all(crop == np.array(shapes.COLOR_RGB[color], np.uint8), axis=-1)
    rows, cols = np.nonzero(hit)
    assert rows.size, f'no {color} pixels in box {box}'
    return (top + rows.min(), left + cols.min(), top + rows.max(),
            left + cols.max())


def _boxes_disjoint(a, b) -> bool:
    return a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


def _check_pixels_match_boxes(image: np.ndarray, objects: list[dict]) -> None:
    """Each box is the tight box of its object's colour; nothing leaks out."""
    for obj in objects:
        assert _colour_box(image, obj['color'], obj['box_px']) == tuple(
            obj['box_px'])
    for color in {o['color'] for o in objects} | set(shapes.COLORS):
        hit = np.all(image == np.array(shapes.COLOR_RGB[color], np.uint8), -1)
        covered = np.zeros_like(hit)
        for obj in objects:
            if obj['color'] == color:
                top, left, bottom, right = obj['box_px']
                covered[top:bottom + 1, left:right + 1] = True
        assert not np.any(hit & ~covered), f'{color} pixels outside its boxes'


def _mentions(caption: str, color: str, shape: str) -> bool:
    return re.search(rf'\b{color} {shape}s?\b', caption) is not None


def _parse_relations(caption: str) -> list[tuple[tuple[str, str], str,
                                                 tuple[str, str]]]:
    """Finds 'X <relation> Y' between consecutive noun phrases.

    Returns (colour, shape) of X, the relation ('left', 'right', 'above',
    'below') and (colour, shape) of Y.
    """
    colors = '|'.join(shapes.COLORS)
    kinds = '|'.join(shapes.SHAPES)
    noun = (rf'(?:a|an|two|three) (?:small |large )?({colors}) ({kinds})s?')
    relation = '|'.join(sorted(RELATION_WORDS, key=len, reverse=True))
    pattern = re.compile(rf'(?=\b{noun} ({relation}) {noun}\b)')
    found = []
    for m in pattern.finditer(caption):
        found.append(((m.group(1), m.group(2)), RELATION_WORDS[m.group(3)],
                      (m.group(4), m.group(5))))
    return found


def _is_true(relation: str, a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Independent truth check of 'box a <relation> box b' from centres."""
    ay, ax = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
    by, bx = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    horizontal = abs(ax - bx) >= abs(ay - by)
    return {'left': horizontal and ax < bx, 'right': horizontal and ax > bx,
            'above': not horizontal and ay < by,
            'below': not horizontal and ay > by}[relation]


# --------------------------------------------------------------------------
# Fixtures.
# --------------------------------------------------------------------------


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    """Two builds with the same config and one with another seed."""
    roots = {key: str(tmp_path_factory.mktemp(key))
             for key in ('a', 'b', 'other_seed')}
    builders = {key: shapes.build(root, shapes.make_config(
        **TINY, seed=1 if key == 'other_seed' else 0))
        for key, root in roots.items()}
    builders['a_root'] = roots['a']
    return builders


@pytest.fixture(scope='module')
def random_scenes():
    """200 random 64 px scenes with their captions."""
    scenes = []
    for i in range(200):
        rng = np.random.default_rng([123, i])
        image, objects = shapes.render_scene(rng, 64)
        captions = shapes.describe_scene(objects, rng, 64)
        scenes.append((image, objects, captions))
    return scenes


# --------------------------------------------------------------------------
# 1. Determinism.
# --------------------------------------------------------------------------


def test_same_seed_builds_are_identical(built):
    for split in SPLITS:
        recs_a = _records(built['a'], split)
        recs_b = _records(built['b'], split)
        assert len(recs_a) == len(recs_b) > 0
        for ra, rb in zip(recs_a, recs_b):
            assert ra['image_id'] == rb['image_id']
            assert ra['image'].tobytes() == rb['image'].tobytes()
            assert list(ra['captions']) == list(rb['captions'])
            np.testing.assert_array_equal(np.asarray(ra['objects']['bbox']),
                                          np.asarray(rb['objects']['bbox']))
            for key in ('shape', 'color', 'size'):
                assert list(ra['objects'][key]) == list(rb['objects'][key])


def test_other_seed_gives_other_images(built):
    recs_a = _records(built['a'], 'train')
    recs_c = _records(built['other_seed'], 'train')
    same = [ra['image'].tobytes() == rc['image'].tobytes()
            for ra, rc in zip(recs_a, recs_c)]
    assert not any(same)


def test_render_and_describe_depend_only_on_rng_state():
    def make(seed):
        rng = np.random.default_rng(seed)
        image, objects = shapes.render_scene(rng, 64)
        return image, objects, shapes.describe_scene(objects, rng, 64)

    first, again, other = make([5, 1, 2]), make([5, 1, 2]), make([5, 1, 3])
    assert first[0].tobytes() == again[0].tobytes()
    assert first[1:] == again[1:]
    assert first[0].tobytes() != other[0].tobytes()


def test_max_objects_is_respected_and_bounded():
    for i in range(30):
        _, objects = shapes.render_scene(np.random.default_rng(i), 64,
                                         max_objects=1)
        assert len(objects) == 1
    with pytest.raises(ValueError):
        shapes.render_scene(np.random.default_rng(0), 64, max_objects=4)
    assert shapes.make_config(max_objects=1).name != shapes.make_config().name


def test_config_names_encode_every_parameter():
    assert shapes.ShapesCaptions.name == 'shapes_captions'
    default = shapes.make_config()
    assert default.name == 's64_n10000-500-500_seed0'
    assert shapes.ShapesCaptions.BUILDER_CONFIGS[0].name == default.name
    variants = [shapes.make_config(image_size=32), shapes.make_config(
        num_train=5), shapes.make_config(num_val=5), shapes.make_config(
        num_test=5), shapes.make_config(seed=1)]
    names = {c.name for c in variants} | {default.name}
    assert len(names) == len(variants) + 1


# --------------------------------------------------------------------------
# 2. Boxes and pixels.
# --------------------------------------------------------------------------


def test_boxes_are_tight_around_rendered_colour(random_scenes):
    for image, objects, _ in random_scenes:
        assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
        assert 1 <= len(objects) <= 3
        _check_pixels_match_boxes(image, objects)


def test_boxes_do_not_overlap(random_scenes):
    for _, objects, _ in random_scenes:
        for a, b in itertools.combinations(objects, 2):
            assert _boxes_disjoint(a['box_px'], b['box_px'])


def test_scene_statistics_are_varied(random_scenes):
    counts = {len(objects) for _, objects, _ in random_scenes}
    assert counts == {1, 2, 3}
    seen = {(o['shape'], o['color'], o['size'])
            for _, objects, _ in random_scenes for o in objects}
    assert {s for s, _, _ in seen} == set(shapes.SHAPES)
    assert {c for _, c, _ in seen} == set(shapes.COLORS)


def test_sizes_are_clearly_different(random_scenes):
    for _, objects, _ in random_scenes:
        for obj in objects:
            top, left, bottom, right = obj['box_px']
            extent = max(bottom - top, right - left) + 1
            if obj['size'] == 'small':
                assert 9 <= extent <= 15
            else:
                assert 19 <= extent <= 25


def test_background_is_grey_and_never_an_object_colour(random_scenes):
    for image, objects, _ in random_scenes:
        background = np.ones(image.shape[:2], bool)
        for obj in objects:
            top, left, bottom, right = obj['box_px']
            background[top:bottom + 1, left:right + 1] = False
        pixels = image[background].astype(int)
        assert np.all(pixels[:, 0] == pixels[:, 1])
        assert np.all(pixels[:, 1] == pixels[:, 2])


def test_colour_palette_is_well_separated():
    rgbs = np.array([shapes.COLOR_RGB[c] for c in shapes.COLORS], float)
    assert len(shapes.COLORS) >= 6 and set(shapes.COLOR_RGB) >= set(
        shapes.COLORS)
    for a, b in itertools.combinations(rgbs, 2):
        assert np.linalg.norm(a - b) > 80
    # Saturated: far from the grey axis R == G == B.
    assert np.all(rgbs.max(axis=1) - rgbs.min(axis=1) > 100)


def test_stored_boxes_match_pixels_in_the_data_source(built):
    builder = built['a']
    size = TINY['image_size']
    for split in SPLITS:
        for record in _records(builder, split):
            objects = []
            for color, bbox in zip(record['objects']['color'],
                                   record['objects']['bbox']):
                ymin, xmin, ymax, xmax = (float(v) * size for v in bbox)
                # Normalised edges: top/S, left/S, (bottom+1)/S, (right+1)/S.
                box = (round(ymin), round(xmin), round(ymax) - 1,
                       round(xmax) - 1)
                objects.append({'color': shapes.COLORS[int(color)],
                                'box_px': box})
            _check_pixels_match_boxes(record['image'], objects)


def test_bbox_to_px_inverts_the_documented_mapping():
    # Rows 16..31 and columns 32..47 of a 64 px image.
    assert shapes.bbox_to_px([0.25, 0.5, 0.5, 0.75], 64) == (16, 32, 31, 47)
    assert shapes.bbox_to_px(np.float32([0, 0, 1, 1]), 48) == (0, 0, 47, 47)


# --------------------------------------------------------------------------
# 3. Captions.
# --------------------------------------------------------------------------


def test_caption_format(random_scenes):
    for _, _, captions in random_scenes:
        assert len(captions) == 5
        assert len(set(captions)) == 5, 'references should differ'
        for caption in captions:
            assert CAPTION_CHARS.match(caption), caption
            assert len(caption.split()) <= 20
            assert not re.search(r'\ba [aeiou]', caption), caption
            assert not re.search(r'\ban [^aeiou]', caption), caption


def test_every_object_is_mentioned(random_scenes):
    for _, objects, captions in random_scenes:
        for caption in captions:
            for obj in objects:
                assert _mentions(caption, obj['color'], obj['shape']), (
                    caption, obj)


def test_random_scene_relations_are_true(random_scenes):
    checked = 0
    for _, objects, captions in random_scenes:
        kinds = [(o['color'], o['shape']) for o in objects]
        if len(set(kinds)) != len(kinds):
            continue  # Only scenes where a noun phrase names one object.
        boxes = {kind: o['box_px'] for kind, o in zip(kinds, objects)}
        for caption in captions:
            relations = _parse_relations(caption)
            # With distinct objects every link between phrases is a relation.
            assert len(relations) == len(objects) - 1, caption
            for x, relation, y in relations:
                assert _is_true(relation, boxes[x], boxes[y]), (caption, boxes)
                checked += 1
    assert checked > 300


@pytest.mark.parametrize('circle_box, square_box, truth', [
    ((26, 4, 37, 15), (26, 40, 37, 51), 'left'),     # Side by side.
    ((26, 44, 37, 55), (20, 2, 41, 23), 'right'),    # Circle on the right.
    ((2, 24, 13, 35), (40, 20, 61, 41), 'above'),    # Stacked.
    ((46, 10, 57, 21), (3, 20, 14, 31), 'below'),    # Circle at the bottom.
    ((2, 2, 13, 13), (40, 20, 51, 31), 'above'),     # Diagonal, mostly down.
])
def test_two_object_relations_are_true(circle_box, square_box, truth):
    inverse = {'left': 'right', 'right': 'left', 'above': 'below',
               'below': 'above'}
    objects = [_obj('circle', 'red', 'small', circle_box),
               _obj('square', 'blue', 'large', square_box)]
    allowed = {(('red', 'circle'), truth, ('blue', 'square')),
               (('blue', 'square'), inverse[truth], ('red', 'circle'))}
    for seed in range(10):
        for caption in _captions(objects, seed):
            relations = _parse_relations(caption)
            assert len(relations) == 1, caption
            assert relations[0] in allowed, caption


def test_single_object_caption_and_articles():
    objects = [_obj('square', 'orange', 'large', (10, 10, 31, 31))]
    captions = _captions(objects)
    assert captions[0] == 'a large orange square'
    assert all('an orange square' in c or 'a large orange square' in c
               for c in captions)


def test_captions_depend_on_rng():
    objects = [_obj('circle', 'red', 'small', (26, 4, 37, 15)),
               _obj('square', 'blue', 'large', (26, 40, 47, 61))]
    sets = {tuple(_captions(objects, seed)) for seed in range(10)}
    assert len(sets) > 1


# --------------------------------------------------------------------------
# 4. Counts.
# --------------------------------------------------------------------------


def test_two_same_circles_use_a_count():
    objects = [_obj('circle', 'red', 'small', (10, 5, 21, 16)),
               _obj('circle', 'red', 'small', (40, 45, 51, 56))]
    for seed in range(5):
        captions = _captions(objects, seed)
        assert 'two small red circles' in captions[0]
        for caption in captions:
            assert re.search(r'\btwo (small )?red circles\b', caption), caption
            assert not re.search(r'\ban? (small )?red circle\b', caption)


def test_count_without_shared_size_drops_the_size():
    objects = [_obj('circle', 'red', 'small', (10, 5, 21, 16)),
               _obj('circle', 'red', 'large', (30, 35, 51, 56))]
    for caption in _captions(objects):
        assert re.search(r'\btwo red circles\b', caption), caption
        assert 'small' not in caption and 'large' not in caption


def test_three_of_a_kind_and_a_count_next_to_another_object():
    triangles = [_obj('triangle', 'green', 'large', (2, 2, 23, 23)),
                 _obj('triangle', 'green', 'large', (2, 35, 23, 56)),
                 _obj('triangle', 'green', 'large', (38, 20, 59, 41))]
    for caption in _captions(triangles):
        assert re.search(r'\bthree (large )?green triangles\b', caption)
    mixed = [_obj('circle', 'red', 'small', (5, 5, 16, 16)),
             _obj('circle', 'red', 'small', (40, 5, 51, 16)),
             _obj('square', 'blue', 'small', (20, 45, 31, 56))]
    for caption in _captions(mixed):
        assert re.search(r'\btwo (small )?red circles\b', caption), caption
        assert _mentions(caption, 'blue', 'square'), caption
        # Both circles are left of the square, so a relation, if stated,
        # must say so.
        for x, relation, y in _parse_relations(caption):
            assert (x, relation, y) in {
                (('red', 'circle'), 'left', ('blue', 'square')),
                (('blue', 'square'), 'right', ('red', 'circle'))}, caption


# --------------------------------------------------------------------------
# 5. Record format.
# --------------------------------------------------------------------------


def test_data_source_record_format(built):
    builder = built['a']
    size = TINY['image_size']
    expected_len = {'train': TINY['num_train'], 'val': TINY['num_val'],
                    'test': TINY['num_test']}
    ids = []
    for split in SPLITS:
        source = builder.as_data_source(split)
        assert len(source) == expected_len[split]
        for record in (source[i] for i in range(len(source))):
            assert record['image'].dtype == np.uint8
            assert record['image'].shape == (size, size, 3)
            assert all(isinstance(c, bytes) for c in record['captions'])
            captions = [c.decode() for c in record['captions']]
            assert len(captions) == 5 and all(CAPTION_CHARS.match(c)
                                              for c in captions)
            objects = record['objects']
            num = len(objects['bbox'])
            assert 1 <= num <= 3
            for key, names in (('shape', shapes.SHAPES),
                               ('color', shapes.COLORS),
                               ('size', shapes.SIZES)):
                labels = np.asarray(objects[key])
                assert labels.shape == (num,)
                assert np.all((labels >= 0) & (labels < len(names)))
            bbox = np.asarray(objects['bbox'])
            assert bbox.shape == (num, 4) and bbox.dtype == np.float32
            assert np.all((bbox >= 0) & (bbox <= 1))
            ids.append(int(record['image_id']))
    assert len(ids) == len(set(ids)) == sum(expected_len.values())


def test_build_twice_reuses_the_prepared_data(built):
    files = sorted(built['a'].data_path.iterdir())
    mtimes = [os.stat(p).st_mtime_ns for p in files]
    again = shapes.build(built['a_root'], shapes.make_config(**TINY, seed=0))
    assert sorted(again.data_path.iterdir()) == files
    assert [os.stat(p).st_mtime_ns for p in files] == mtimes
    assert len(again.as_data_source('train')) == TINY['num_train']


def test_tensorflow_is_kept_off_gpus_before_a_build_and_not_touched_after(tmp_path, monkeypatch):
    """TFDS builds with TensorFlow, which would otherwise start on the GPUs that JAX holds."""
    from jaxcap import data
    calls = []
    monkeypatch.setattr(data, 'keep_tensorflow_on_cpu',
                        lambda: calls.append(any(tmp_path.rglob('*.array_record*'))))
    config = shapes.make_config(**TINY, seed=0)
    shapes.build(str(tmp_path), config)
    assert calls == [False]  # once, before any file was written
    shapes.build(str(tmp_path), config)
    assert calls == [False]


def test_a_built_data_set_is_read_without_tensorflow(built, tensorflow_modules_after):
    """Only building needs TensorFlow (~4 s to import); training reads without it."""
    code = ('from jaxcap.data import shapes; '
            f'b = shapes.build({built["a_root"]!r}, shapes.make_config(**{TINY!r}, seed=0)); '
            "assert b.as_data_source('train')[0]['image'].shape == (48, 48, 3)")
    assert tensorflow_modules_after(code) == []
