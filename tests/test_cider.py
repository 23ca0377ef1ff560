"""Tests for jaxcap.metrics.CiderD against pycocoevalcap's Cider (the official CIDEr-D)."""

import random
import time

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from jaxcap import metrics

requires_java = pytest.mark.skipif(not metrics.java_available(), reason='needs Java')

# Lower-case words (already tokenised, as coco-caption feeds CIDEr), some of them
# non-ASCII: accents, a German sharp s, CJK, Greek, Cyrillic, a combining mark, an emoji.
_UNICODE_WORDS = ['café', 'straße', '猫', 'βάρκα', 'собака', 'nai\u0308ve', '🐕', 'ŋa', 'ǆungla']
# pycocoevalcap splits with str.split(), so any Unicode whitespace separates words.
_SEPARATORS = [' '] * 8 + ['  ', '\t', '\u3000', '\u2028']


def _vocabulary(rng: random.Random, size: int) -> list[str]:
    words = [f'w{i}' for i in range(size)] + rng.sample(_UNICODE_WORDS, 4)
    assert all(w == w.lower() for w in words)
    return words


def _sentence(rng: random.Random, words: list[str], length: int) -> str:
    # A skewed choice, so that frequent words are shared across images (low IDF) and
    # rare ones are not (high IDF).
    chosen = [words[min(int(rng.expovariate(4 / len(words))), len(words) - 1)]
              for _ in range(length)]
    return ''.join(rng.choice(_SEPARATORS) + w for w in chosen).lstrip(' ')


def _candidate(rng: random.Random, words: list[str], refs: list[str]) -> str:
    kind = rng.randrange(7)
    if kind == 0:
        return rng.choice(['', ' ', '\t'])  # empty
    if kind == 1:
        return ' '.join([rng.choice(words)] * rng.randint(2, 9))  # one word repeated
    if kind == 2:
        return _sentence(rng, words, rng.randint(25, 60))  # much longer than any reference
    if kind == 3:
        return rng.choice(refs)  # a copy of a reference
    if kind == 4:  # a reference with repeated chunks
        ref = rng.choice(refs).split()
        return ' '.join(ref + ref[: rng.randint(1, len(ref))])
    return _sentence(rng, words, rng.randint(1, 14))


def _caption_set(seed: int, num_images: int, vocab_size: int, max_refs: int, min_refs: int = 1):
    """Random references ({id: [str]}) and candidates ({id: str}) from a seeded generator."""
    rng = random.Random(seed)
    words = _vocabulary(rng, vocab_size)
    references, candidates = {}, {}
    for i in range(num_images):
        image_id = rng.choice([i, f'img{i}', (i, 'x')])  # ids of any hashable type
        num_refs = rng.randint(min_refs, max_refs)
        refs = [_sentence(rng, words, rng.randint(1, 16)) for _ in range(num_refs)]
        references[image_id] = refs
        candidates[image_id] = _candidate(rng, words, refs)
    return references, candidates


def _official(references, candidates):
    """pycocoevalcap's CIDEr on the same strings, per image in the order of ``candidates``."""
    gts = {i: references[i] for i in candidates}
    mean, per_image = Cider().compute_score(gts, {i: [c] for i, c in candidates.items()})
    return float(mean), np.asarray(per_image)


# (seed, num_images, vocabulary size, most references per image)
CASES = [
    (0, 1, 10, 5),       # one image: log(1) = 0 reference length, every score is 0
    (1, 2, 6, 3),        # two images, tiny vocabulary: many n-grams in every image (IDF 0)
    (2, 3, 30, 1),       # one reference each
    (3, 20, 8, 7),
    (4, 50, 40, 5),
    (5, 200, 100, 6),
    (6, 400, 300, 4),
    (7, 60, 5, 2),
]


@pytest.mark.parametrize(('seed', 'num_images', 'vocab_size', 'max_refs'), CASES)
def test_equals_pycocoevalcap(seed, num_images, vocab_size, max_refs):
    references, candidates = _caption_set(seed, num_images, vocab_size, max_refs)
    expected_mean, expected = _official(references, candidates)
    mean, per_image = metrics.CiderD(references).score(candidates)
    assert per_image.dtype == np.float64 and per_image.shape == (num_images,)
    np.testing.assert_allclose(per_image, expected, rtol=0, atol=1e-6)
    assert mean == pytest.approx(expected_mean, abs=1e-6)
    if num_images > 1:
        assert np.count_nonzero(expected) > num_images // 4  # the sets are not degenerate


@pytest.mark.parametrize('sigma', [0.5, 2.0, 10.0])
def test_other_sigmas_equal_pycocoevalcap(sigma):
    references, candidates = _caption_set(20, 80, 25, 5)
    gts = {i: references[i] for i in candidates}
    expected_mean, expected = Cider(sigma=sigma).compute_score(
        gts, {i: [c] for i, c in candidates.items()})
    mean, per_image = metrics.CiderD(references, sigma=sigma).score(candidates)
    np.testing.assert_allclose(per_image, expected, rtol=0, atol=1e-6)
    assert mean == pytest.approx(expected_mean, abs=1e-6)


def test_single_image_scores_zero():
    # pycocoevalcap's reference length is log(number of images) = log(1) = 0, and every
    # n-gram of the references has document frequency 1, so every tf-idf weight is 0.
    mean, per_image = metrics.CiderD({'a': ['a dog runs']}).score({'a': 'a dog runs'})
    assert mean == 0.0 and per_image.tolist() == [0.0]


def test_hand_computed_scores():
    # Two images; N = 2, so IDF = log(2) - log(df) = log(2) for n-grams seen in one image.
    # Image 1: candidate == reference "a b": the unigram and bigram cosines are 1, no
    # trigrams or 4-grams (norm 0 -> 0), equal bigram counts -> no length penalty:
    #   10 * mean([1, 1, 0, 0]) = 5.
    # Image 2: an empty candidate scores 0.
    mean, per_image = metrics.CiderD({1: ['a b'], 2: ['c d']}).score({1: 'a b', 2: ''})
    assert per_image == pytest.approx([5.0, 0.0], abs=1e-12)
    assert mean == pytest.approx(2.5, abs=1e-12)


def test_length_penalty_uses_bigram_counts():
    # Candidate "a b a b" vs reference "a b": tf-idf vectors (log 2 weights):
    #   unigrams: hyp (2, 2), ref (1, 1): clipped dot = 2 * 1 * 1 = 2 (times log(2)^2);
    #     norms sqrt(8), sqrt(2) -> cos = 2 / 4 = 0.5.
    #   bigrams: hyp {ab: 2, ba: 1}, ref {ab: 1}: clipped dot = 1 -> cos = 1 / sqrt(5).
    # Bigram counts 3 vs 1 (pycocoevalcap's "length"), so the penalty is exp(-4 / 72).
    _, per_image = metrics.CiderD({1: ['a b'], 2: ['c d']}).score({1: 'a b a b'})
    expected = 10 * np.exp(-4 / 72) * (0.5 + 1 / np.sqrt(5)) / 4
    assert per_image[0] == pytest.approx(expected, rel=1e-12)


def test_case_is_folded():
    rng = random.Random(11)
    references, candidates = _caption_set(11, 30, 20, 4)
    upper = {i: [r.upper() if rng.random() < 0.5 else r.title() for r in refs]
             for i, refs in references.items()}
    _, expected = _official(references, candidates)
    _, per_image = metrics.CiderD(upper).score({i: c.upper() for i, c in candidates.items()})
    np.testing.assert_allclose(per_image, expected, rtol=0, atol=1e-6)


def test_subsets_and_order_use_the_full_corpus():
    references, candidates = _caption_set(12, 40, 30, 5)
    cider = metrics.CiderD(references)
    _, full = cider.score(candidates)
    by_id = dict(zip(candidates, full, strict=True))
    ids = list(candidates)
    random.Random(0).shuffle(ids)
    subset = {i: candidates[i] for i in ids[:13]}  # shuffled order, a third of the images
    mean, per_image = cider.score(subset)
    np.testing.assert_allclose(per_image, [by_id[i] for i in subset], rtol=0, atol=1e-12)
    assert mean == pytest.approx(np.mean([by_id[i] for i in subset]), abs=1e-12)
    assert cider.num_images == 40


def test_repeated_scoring_is_identical_and_does_not_grow_the_vocabulary():
    references, candidates = _caption_set(13, 30, 30, 5)
    cider = metrics.CiderD(references)
    vocab_size = len(cider._vocab)
    first = cider.score(candidates)[1]
    cider.score({i: 'zzz unseen words only' for i in references})
    second = cider.score(candidates)[1]
    np.testing.assert_array_equal(first, second)
    assert len(cider._vocab) == vocab_size


@pytest.mark.parametrize(
    ('references', 'candidates', 'error', 'pattern'),
    [
        ({}, {}, ValueError, 'references are empty'),
        ({'a': []}, {'a': 'x'}, ValueError, 'empty'),
        ({'a': [' ']}, {'a': 'x'}, ValueError, 'blank'),
        ({'a': 'a dog'}, {'a': 'x'}, TypeError, 'list of strings'),
        ({'a': ['a dog']}, {}, ValueError, 'candidates are empty'),
        ({'a': ['a dog']}, {'a': 'x', 'b': 'y'}, ValueError, r"no references \('b'\)"),
        ({'a': ['a dog']}, {'a': ['a dog']}, TypeError, 'must be a string'),
    ],
)
def test_bad_input_raises(references, candidates, error, pattern):
    with pytest.raises(error, match=pattern):
        metrics.CiderD(references).score(candidates)


def test_bad_sigma_raises():
    with pytest.raises(ValueError, match='sigma > 0'):
        metrics.CiderD({'a': ['a dog']}, sigma=0.0)


@requires_java
def test_tokenize_matches_score_captions_tokenisation():
    # Raw captions: capitals, punctuation, a possessive and a punctuation-only candidate.
    references = {
        1: ["A man's dog, running!", 'The dog runs (fast).'],
        2: ['Two cats -- asleep.', 'Cats sleeping on a sofa...'],
        3: ['A red bus.', 'A bus on the road; red.'],
    }
    candidates = {1: 'A dog runs.', 2: '...', 3: 'The red bus!'}
    # The same PTB tokenisation, in the same call, that score_captions uses.
    gts, res = metrics._tokenize_all(references, candidates, list(references))
    expected_mean, expected = Cider().compute_score(gts, res)
    mean, per_image = metrics.CiderD(references, tokenize=True).score(candidates)
    np.testing.assert_allclose(per_image, expected, rtol=0, atol=1e-12)
    assert mean == pytest.approx(expected_mean, abs=1e-12)
    assert per_image[0] > 0 and per_image[1] == 0.0


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_much_faster_than_pycocoevalcap():
    # Measured on a quiet 2-core CPU: 5,000 images x 5 references score in ~0.2 s, 20x
    # faster than pycocoevalcap. Timing both here, in one process, keeps the check
    # meaningful on a loaded CI machine; 5x still catches a fall back to per-n-gram Python.
    references, candidates = _caption_set(15, 1000, 2000, max_refs=5, min_refs=5)
    cider = metrics.CiderD(references)
    ours = min(_seconds(lambda: cider.score(candidates)) for _ in range(3))
    official = _seconds(lambda: _official(references, candidates))
    assert ours * 5 < official, (ours, official)
