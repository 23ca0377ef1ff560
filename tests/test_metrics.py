"""Tests for jaxcap.metrics (pycocoevalcap wrapper; CiderD is in test_cider.py).

METEOR's JVM takes 10-20 s to start, so Java-backed tests share one
module-scoped CaptionScorer plus one one-shot score_captions call.
"""

import contextlib
import io
import math
import os

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from jaxcap import metrics

requires_java = pytest.mark.skipif(not metrics.java_available(), reason='needs Java')

# Several images with distinct vocabularies, so CIDEr's IDF weights are meaningful.
REFS = {
    'img1': ['A man riding a horse on the beach.', 'A person rides a brown horse near the ocean.'],
    'img2': ['Two cats sleeping on a red sofa.', 'A pair of cats napping on a couch.'],
    'img3': ['A double decker bus driving down a city street.', 'A red bus on the road.'],
    'img4': ['A plate of pasta with broccoli and cheese.', 'Food on a white plate.'],
    'img5': ['A child flying a kite in a park.', 'A young boy plays with a kite on the grass.'],
}
EXACT = {image_id: refs[0] for image_id, refs in REFS.items()}
WRONG = {
    'img1': 'zebras graze quietly',
    'img2': 'snowy mountain peaks',
    'img3': 'violin concert hall',
    'img4': '',  # empty and punctuation-only candidates must not crash either
    'img5': '...',
}

# A realistic hand-made set: pycocoevalcap ships no example data (its
# example/coco_eval_example.py reads COCO's captions_val2014.json, not included).
HANDMADE_REFS = {
    101: ['A man is riding a wave on top of a surfboard.',
          'A surfer rides a large wave in the ocean.',
          'Man on a surfboard riding an ocean wave.'],
    102: ['Two giraffes standing next to each other in a field.',
          'A couple of giraffes eating leaves from the trees.'],
    103: ['A kitchen with wooden cabinets and a white stove.',
          "The kitchen's counter is cluttered with pots, pans and dishes.",
          'A small kitchen with a stove and a sink.'],
    104: ['A red fire hydrant on the side of a street.', 'A fire hydrant painted red and white.'],
    105: ['A plate of food with broccoli, rice and chicken.',
          'Chicken and vegetables served on a white plate.',
          'A healthy meal on a dinner plate.',
          'A plate holds rice with meat and broccoli.'],
    106: ['A group of people flying kites on a beach.', 'Kites in the sky over a sandy beach.'],
}
HANDMADE_CANDIDATES = {
    101: 'A man riding a wave on a surfboard.',
    102: 'two giraffes standing in a field',
    # Empty, but not last: pycocoevalcap's own tokenizer drops a trailing empty line.
    103: '',
    104: 'a red and white fire hydrant',
    105: 'a plate of food with broccoli broccoli broccoli',
    106: 'People fly kites at the beach!',
}


def _child_java_pids() -> list[int]:
    """Pids of java processes whose parent is this test process."""
    pids = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat') as f:
                stat = f.read()
        except OSError:
            continue  # the process exited while we were looking
        comm = stat[stat.index('(') + 1 : stat.rindex(')')]
        ppid = int(stat[stat.rindex(')') + 2 :].split()[1])
        if comm == 'java' and ppid == os.getpid():
            pids.append(int(entry))
    return pids


@pytest.fixture(scope='module')
def scorer():
    with metrics.CaptionScorer() as s:
        yield s


@pytest.fixture(scope='module')
def one_shot(scorer):
    """One score_captions call on the hand-made set: its scores, what it printed and java
    children left.

    Depends on ``scorer`` only so that both METEOR JVMs load concurrently.
    """
    before = set(_child_java_pids())  # the scorer's own JVM
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        scores = metrics.score_captions(HANDMADE_REFS, HANDMADE_CANDIDATES)
    left_behind = sorted(set(_child_java_pids()) - before)
    return scores, buffer.getvalue(), left_behind


def _official_tokenize(references, candidates):
    """pycocoevalcap's PTBTokenizer, called as COCOEvalCap.evaluate calls it."""
    if not os.access(os.path.dirname(metrics._PTB_JAR), os.W_OK):
        # It writes a temp file next to its jar; on a read-only install use our
        # stdin version of the same command (equal where both run, see below).
        return metrics._tokenize_all(references, candidates, list(references))
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # noqa: PLC0415

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{'caption': r} for r in refs] for i, refs in references.items()})
    res = tokenizer.tokenize({i: [{'caption': c}] for i, c in candidates.items()})
    return gts, res


@requires_java
def test_score_captions_reproduces_pycocoevalcap(one_shot, scorer):
    # The steps of pycocoevalcap's COCOEvalCap.evaluate (minus SPICE), each scorer called directly.
    ours, _, _ = one_shot
    gts, res = _official_tokenize(HANDMADE_REFS, HANDMADE_CANDIDATES)
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts, res)
    # The scorer's METEOR is a pycocoevalcap Meteor object; reusing its JVM saves a 15 s start.
    meteor, _ = scorer._meteor.compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    expected = dict(zip(metrics.METRIC_NAMES, [*bleu, meteor, rouge, cider], strict=True))
    assert ours.keys() == expected.keys()
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name
    # Not a degenerate set where every metric is 0 or 1 (measured: 0.30 to 0.57, CIDEr 1.74).
    assert all(0.2 < value < 0.8 for name, value in expected.items() if name != 'CIDEr')
    assert 1.0 < expected['CIDEr'] < 3.0


@requires_java
def test_spice_is_reported_unavailable(one_shot):
    scores, _, _ = one_shot
    assert 'SPICE' not in scores
    assert 'offline' in metrics.UNAVAILABLE_METRICS['SPICE']
    assert not set(metrics.UNAVAILABLE_METRICS) & set(metrics.METRIC_NAMES)


@requires_java
def test_exact_candidates_score_perfectly(scorer):
    scores = scorer.score(REFS, EXACT)
    assert tuple(scores) == metrics.METRIC_NAMES
    assert all(isinstance(v, float) for v in scores.values())
    assert scores['Bleu_4'] == pytest.approx(1.0, abs=1e-6)
    assert scores['ROUGE_L'] == pytest.approx(1.0, abs=1e-9)
    assert scores['METEOR'] > 0.99  # coco-caption's METEOR gives exactly 1.0 here
    assert scores['CIDEr'] > 1.0


@requires_java
def test_one_shot_is_quiet_and_leaves_no_jvm(one_shot):
    _, printed, java_children = one_shot
    assert printed == ''  # pycocoevalcap's Bleu prints its counts otherwise
    assert java_children == []


@requires_java
def test_hand_computed_bleu(scorer):
    # After PTB tokenisation (lower-case, '.' dropped):
    #   reference: "the cat sat on the mat"  (r = 6 tokens)
    #   candidate: "the cat on the mat"      (c = 5 tokens)
    # Clipped unigram matches: the x2 (ref has 2), cat, on, mat -> p1 = 5/5
    # Bigrams: "the cat" yes, "cat on" no, "on the" yes, "the mat" yes -> p2 = 3/4
    # Trigrams: "the cat on" no, "cat on the" no, "on the mat" yes -> p3 = 1/3
    # Brevity penalty: c < r -> BP = exp(1 - r/c) = exp(1 - 6/5) = exp(-0.2)
    # Bleu_n = BP * (p1 * ... * pn) ** (1/n)
    #   Bleu_1 = exp(-0.2)                         = 0.818730...
    #   Bleu_2 = exp(-0.2) * sqrt(3/4)             = 0.709041...
    #   Bleu_3 = exp(-0.2) * (3/4 * 1/3) ** (1/3)  = 0.515771...
    # coco-caption adds tiny = 1e-15 to match counts and small = 1e-9 to guess counts
    # and lengths, which changes these values by ~1e-10 relative: below the tolerance.
    # Bleu_4 is where the smoothing shows: 4-grams "the cat on the", "cat on the mat"
    # have 0 matches of 2 guesses, so p4 = 1e-15 / 2 and, under the 4th root,
    #   Bleu_4 = exp(-0.2) * (3/4 * 1/3 * 1e-15/2) ** (1/4) = 8.657e-05, not 0.
    scores = scorer.score({0: ['The cat sat on the mat.']}, {0: 'the cat on the mat'})
    bp = math.exp(1 - 6 / 5)
    assert scores['Bleu_1'] == pytest.approx(bp, rel=1e-6)
    assert scores['Bleu_2'] == pytest.approx(bp * math.sqrt(3 / 4), rel=1e-6)
    assert scores['Bleu_3'] == pytest.approx(bp * (3 / 4 * 1 / 3) ** (1 / 3), rel=1e-6)
    assert scores['Bleu_4'] == pytest.approx(bp * (3 / 4 * 1 / 3 * 1e-15 / 2) ** (1 / 4), rel=1e-6)


@requires_java
def test_wrong_candidates_score_near_zero(scorer):
    scores = scorer.score(REFS, WRONG)
    assert scores['CIDEr'] < 0.05
    assert scores['Bleu_1'] < 1e-6


@requires_java
def test_empty_candidates_score_zero(scorer):
    scores = scorer.score(REFS, {image_id: '' for image_id in REFS})
    assert scores['Bleu_1'] == pytest.approx(0.0, abs=1e-12)
    assert scores['METEOR'] == 0.0
    assert scores['ROUGE_L'] == 0.0
    assert scores['CIDEr'] == 0.0


@requires_java
def test_repeated_calls_are_identical(one_shot, scorer):
    first = scorer.score(HANDMADE_REFS, HANDMADE_CANDIDATES)
    second = scorer.score(HANDMADE_REFS, HANDMADE_CANDIDATES)
    assert first == second == one_shot[0]


@requires_java
def test_ptb_tokenize_keeps_captions_aligned():
    # \r and U+2028 are line breaks to Java: pycocoevalcap's own wrapper would
    # split such a caption and shift every later caption to the wrong image.
    captions = ['Hi\r\nthere\u2028you', '', 'A dog, running!', '...', 'Café noir']
    assert metrics.ptb_tokenize(captions) == ['hi there you', '', 'a dog running', '', 'café noir']


def test_mismatched_ids_raise_naming_the_ids():
    candidates = dict(EXACT)
    del candidates['img3']
    candidates['img9'] = 'a dog'
    with pytest.raises(ValueError, match=r"'img3'.*'img9'"):
        metrics.score_captions(REFS, candidates)


@pytest.mark.parametrize(
    ('references', 'error', 'pattern'),
    [
        ({'a': []}, ValueError, 'empty'),
        ({'a': ['  ']}, ValueError, 'blank'),
        ({'a': 'a dog runs'}, TypeError, 'list of strings'),
        ({}, ValueError, 'Nothing to score'),
    ],
)
def test_bad_references_raise(references, error, pattern):
    candidates = {image_id: 'a dog' for image_id in references}
    with pytest.raises(error, match=pattern):
        metrics.score_captions(references, candidates)


def test_non_string_candidate_raises():
    with pytest.raises(TypeError, match='must be a string'):
        metrics.score_captions({'a': ['a dog']}, {'a': ['a dog']})


def test_missing_java_raises_with_install_hint(monkeypatch):
    monkeypatch.setattr(metrics.shutil, 'which', lambda name: None)
    assert not metrics.java_available()
    with pytest.raises(RuntimeError, match='Java 8'):
        metrics.score_captions({'a': ['a dog']}, {'a': 'a dog'})


@requires_java
def test_closed_scorer_raises():
    scorer = metrics.CaptionScorer()
    scorer.close()
    scorer.close()  # idempotent
    with pytest.raises(RuntimeError, match='closed'):
        scorer.score({'a': ['a dog']}, {'a': 'a dog'})


@requires_java
@pytest.mark.skipif(
    not os.access(os.path.dirname(metrics._PTB_JAR), os.W_OK),
    reason="pycocoevalcap's PTBTokenizer needs a writable package dir",
)
def test_ptb_tokenize_matches_pycocoevalcap():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # noqa: PLC0415

    captions = [
        "A man's hat (red) isn't on the table-top.",
        'Two  dogs,\tplaying "fetch" -- in the park!',
        'U.S. flag at 5:30 p.m.; nice...',
        *REFS['img1'],
    ]
    official = PTBTokenizer().tokenize({i: [{'caption': c}] for i, c in enumerate(captions)})
    assert metrics.ptb_tokenize(captions) == [official[i][0] for i in range(len(captions))]
