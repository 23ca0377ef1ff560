"""Official COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D).

Scores come from ``pycocoevalcap`` (the pip package of coco-caption), so the
numbers are comparable with published results. Captions are tokenised with the
same Stanford PTB tokenizer jar and punctuation list that coco-caption uses.

Two ways to score:
    * :func:`score_captions` / :class:`CaptionScorer`: the official numbers
      (PTB tokenisation, Java for METEOR), for reporting.
    * :class:`CiderD`: the same CIDEr (CIDEr-D) in-process with numpy, no
      Java, document frequencies precomputed once; scores 5,000 images in
      well under a second, e.g. for validation during training.

Notes:
    * SPICE is not reported (``'SPICE' in UNAVAILABLE_METRICS``; the score
      dicts never contain it): it needs Stanford CoreNLP model jars that
      pycocoevalcap downloads on first use, and this project must work
      offline.
    * ``CIDEr`` is coco-caption's CIDEr-D (clipped n-gram counts, Gaussian
      length penalty, sigma=6). Its IDF weights are computed from the
      references that are scored, so it is only meaningful on a corpus of
      many images (on a single image every IDF weight is zero).
    * BLEU is corpus-level (n-gram counts summed over all images before the
      geometric mean), exactly as coco-caption reports it.

pycocoevalcap pitfalls handled here:
    * ``PTBTokenizer.tokenize`` writes a temp file into its own package
      directory, which fails on read-only installs (verified: EROFS); it also
      only replaces ``\\n`` inside captions, so ``\\r``, form feeds or U+2028
      split a caption into two lines and shift every later caption onto the
      wrong image.
      We run the same jar and command line ourselves, feeding stdin (no temp
      file), collapse all whitespace first, and check the line count.
    * ``Meteor`` starts a JVM in ``__init__`` and only stops it in
      ``__del__``; a failed call leaves its lock held so ``__del__`` then blocks
      forever. ``score_captions`` (and ``CaptionScorer.close``) stop the JVM
      explicitly, and release a lock left held by a failed call.
    * ``Bleu`` prints its statistics to stdout; we silence it so callers can
      emit clean JSON lines.
    * Empty candidates (or ones that are only punctuation) are handled by all
      four scorers and score 0. Blank references are rejected because
      ROUGE_L would score an empty candidate against them as a perfect match.
    * METEOR's JVM takes ~10-20 s to start (60 MB paraphrase table); use
      :class:`CaptionScorer` to score several sets with one JVM.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import os
import shutil
import subprocess
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

METRIC_NAMES = ('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr')
# coco-caption metrics that are never computed here, with the reason (for reports and logs).
UNAVAILABLE_METRICS = {
    'SPICE': 'not computed: needs Stanford CoreNLP jars that pycocoevalcap downloads on '
             'first use, and evaluation must work offline',
}

_JAVA_HINT = (
    'METEOR and the PTB tokenizer need Java 8+; install e.g. '
    '`apt-get install default-jre-headless`'
)
_PTB_JAR = os.path.join(
    os.path.dirname(os.path.abspath(ptbtokenizer.__file__)),
    ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR,
)
_PUNCTUATION = frozenset(ptbtokenizer.PUNCTUATIONS)
_MAX_IDS_IN_MESSAGE = 5


def java_available() -> bool:
    """Returns whether a ``java`` executable is on the PATH."""
    return shutil.which('java') is not None


def _require_java() -> None:
    if not java_available():
        raise RuntimeError(f'No `java` executable found on PATH. {_JAVA_HINT}.')


def _format_ids(ids: set[Hashable]) -> str:
    """Formats a few ids deterministically (ids may be of mixed types)."""
    shown = sorted(repr(i) for i in ids)[:_MAX_IDS_IN_MESSAGE]
    more = ', ...' if len(ids) > _MAX_IDS_IN_MESSAGE else ''
    return ', '.join(shown) + more


def _check_ids(
    references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str]
) -> None:
    if not references and not candidates:
        raise ValueError('Nothing to score: references and candidates are empty.')
    no_candidate = set(references) - set(candidates)
    no_reference = set(candidates) - set(references)
    if no_candidate or no_reference:
        parts = []
        if no_candidate:
            parts.append(
                f'{len(no_candidate)} reference id(s) have no candidate '
                f'({_format_ids(no_candidate)})'
            )
        if no_reference:
            parts.append(
                f'{len(no_reference)} candidate id(s) have no references '
                f'({_format_ids(no_reference)})'
            )
        raise ValueError('Candidate ids and reference ids differ: ' + '; '.join(parts) + '.')


def _check_references(references: Mapping[Hashable, Sequence[str]]) -> None:
    for image_id, refs in references.items():
        # A bare string is a Sequence[str] of characters: a classic mistake.
        if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise TypeError(
                f'references[{image_id!r}] must be a list of strings, got {refs!r}.'
            )
        if len(refs) == 0:
            raise ValueError(
                f'references[{image_id!r}] is empty; every image needs >= 1 reference.'
            )
        # coco-caption's ROUGE_L scores an empty candidate against an empty reference as 1.0,
        # so a blank reference (a data bug) would silently inflate scores.
        if any(not r.strip() for r in refs):
            raise ValueError(f'references[{image_id!r}] contains a blank caption.')


def _check_candidates(candidates: Mapping[Hashable, str]) -> None:
    for image_id, caption in candidates.items():
        if not isinstance(caption, str):
            raise TypeError(f'candidates[{image_id!r}] must be a string, got {caption!r}.')


def _check_captions(
    references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str]
) -> None:
    _check_references(references)
    _check_candidates(candidates)


def _one_line(text: str) -> str:
    """Collapses all whitespace, since any line break would split a caption in two."""
    return ' '.join(text.split())


def ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """Tokenises sentences exactly like coco-caption's PTBTokenizer.

    Runs the Stanford PTBTokenizer jar shipped with pycocoevalcap (lower-cased,
    one sentence per line) in a single JVM and drops the same punctuation
    tokens coco-caption drops.

    Args:
        sentences: Raw sentences.

    Returns:
        One space-joined token string per input sentence, in order. Sentences
        without any word (empty or punctuation only) become ``''``.

    Raises:
        RuntimeError: If Java is missing or the tokenizer fails.
    """
    _require_java()
    if not sentences:
        return []
    # Same class and flags as pycocoevalcap's PTBTokenizer, so tokens are identical.
    cmd = ['java', '-cp', _PTB_JAR, 'edu.stanford.nlp.process.PTBTokenizer',
           '-preserveLines', '-lowerCase']
    text = ''.join(_one_line(s) + '\n' for s in sentences)
    # Reading stdin (not a temp file in the package dir) works on read-only installs.
    proc = subprocess.run(cmd, input=text.encode('utf-8'), capture_output=True, check=False)
    if proc.returncode != 0:
        stderr = proc.stderr.decode('utf-8', 'replace').strip()
        raise RuntimeError(f'PTB tokenizer failed (exit {proc.returncode}): {stderr[-500:]}')
    lines = proc.stdout.decode('utf-8').split('\n')
    if lines and lines[-1] == '':
        lines.pop()  # The output ends with a newline like the input.
    if len(lines) != len(sentences):
        raise RuntimeError(
            f'PTB tokenizer returned {len(lines)} lines for {len(sentences)} sentences; '
            'captions would be misaligned.'
        )
    return [' '.join(w for w in line.split() if w not in _PUNCTUATION) for line in lines]


def _tokenize_all(
    references: Mapping[Hashable, Sequence[str]],
    candidates: Mapping[Hashable, str],
    ids: Sequence[Hashable],
) -> tuple[dict[Hashable, list[str]], dict[Hashable, list[str]]]:
    """Tokenises references and candidates in one JVM run (JVM start-up dominates)."""
    ref_counts = [len(references[i]) for i in ids]
    flat = [r for i in ids for r in references[i]] + [candidates[i] for i in ids]
    tokens = iter(ptb_tokenize(flat))
    gts = {i: list(itertools.islice(tokens, n)) for i, n in zip(ids, ref_counts)}
    res = {i: [next(tokens)] for i in ids}
    return gts, res


def _close_meteor(meteor: Meteor) -> None:
    """Stops Meteor's JVM now instead of whenever ``Meteor.__del__`` runs."""
    proc = meteor.meteor_p
    # A failed compute_score leaves the lock held; Meteor.__del__ would then block forever.
    if meteor.lock.locked():
        meteor.lock.release()
    with contextlib.suppress(OSError):
        proc.stdin.close()
    proc.kill()
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()


def _meteor_score(
    meteor: Meteor, gts: dict[Hashable, list[str]], res: dict[Hashable, list[str]]
) -> float:
    try:
        score, _ = meteor.compute_score(gts, res)
    except (ValueError, OSError) as err:
        # The JVM died (e.g. could not reserve its 2 GB heap): float(b'') or a broken pipe.
        meteor.meteor_p.kill()
        stderr = meteor.meteor_p.stderr.read().decode('utf-8', 'replace').strip()
        raise RuntimeError(f'METEOR failed ({err!r}): {stderr[-500:]}') from err
    return float(score)


class CaptionScorer:
    """Scores several caption sets while keeping one METEOR JVM alive.

    Starting METEOR's JVM costs ~10-20 s (it loads a 60 MB paraphrase table),
    so reuse one scorer when evaluating many sets; ``score_captions`` is the
    one-shot form. The JVM starts in the constructor, so it loads while the
    captions are being tokenised. Always ``close()`` it (or use ``with``).

    Example:
        with CaptionScorer() as scorer:
            val = scorer.score(val_refs, val_caps)
            test = scorer.score(test_refs, test_caps)
    """

    def __init__(self) -> None:
        _require_java()
        self._meteor: Meteor | None = Meteor()

    def score(
        self,
        references: Mapping[Hashable, Sequence[str]],
        candidates: Mapping[Hashable, str],
    ) -> dict[str, float]:
        """Same contract as :func:`score_captions`."""
        _check_ids(references, candidates)
        _check_captions(references, candidates)
        if self._meteor is None:
            raise RuntimeError('CaptionScorer is closed; create a new one.')
        ids = list(references)
        gts, res = _tokenize_all(references, candidates, ids)
        # Bleu prints its counts to stdout; keep stdout clean for callers' JSON output.
        with contextlib.redirect_stdout(io.StringIO()):
            bleu, _ = Bleu(4).compute_score(gts, res)
            rouge, _ = Rouge().compute_score(gts, res)
            cider, _ = Cider().compute_score(gts, res)
        try:
            meteor = _meteor_score(self._meteor, gts, res)
        except RuntimeError:
            self.close()  # The JVM is gone; later calls should fail clearly.
            raise
        values = [*bleu, meteor, rouge, cider]
        return {name: float(v) for name, v in zip(METRIC_NAMES, values, strict=True)}

    def close(self) -> None:
        """Stops the METEOR JVM. Safe to call more than once."""
        if self._meteor is not None:
            _close_meteor(self._meteor)
            self._meteor = None

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def score_captions(
    references: Mapping[Hashable, Sequence[str]],
    candidates: Mapping[Hashable, str],
) -> dict[str, float]:
    """Scores generated captions with the official COCO caption metrics.

    Both sides are PTB-tokenised first (lower-cased, punctuation removed), as in
    coco-caption. Empty candidates are allowed and score 0.

    Args:
        references: Image id -> one or more human reference captions.
        candidates: Image id -> the generated caption. Must have exactly the
            same ids as ``references``.

    Returns:
        A dict with exactly the keys of ``METRIC_NAMES`` and float values.
        BLEU and METEOR are corpus-level, ROUGE_L and CIDEr are means over
        images. SPICE is never included; ``UNAVAILABLE_METRICS`` says why.

    Raises:
        ValueError: If the id sets differ, nothing is given, or an image has
            no references or a blank reference.
        TypeError: If a caption is not a string (or references are a bare
            string instead of a list).
        RuntimeError: If Java is missing or a Java tool fails.
    """
    # Validate before paying for the METEOR JVM start-up.
    _check_ids(references, candidates)
    _check_captions(references, candidates)
    with CaptionScorer() as scorer:
        return scorer.score(references, candidates)


# Fast in-process CIDEr-D. n-grams of 1..4 words: pycocoevalcap's Cider(n=...) does not
# really change this, its precook always uses 4 (n < 4 crashes, n > 4 adds zeros to a mean).
_CIDER_N = 4


def _split_words(captions: Sequence[str], tokenize: bool) -> list[list[str]]:
    """Words of each caption: PTB tokens, or the cheap lower-case + whitespace split."""
    if tokenize:
        return [line.split() for line in ptb_tokenize(captions)]
    # str.split() is also what pycocoevalcap's precook uses (any Unicode whitespace).
    return [caption.lower().split() for caption in captions]


def _all_ngrams(words_X: list[list[str]]) -> list[tuple[str, ...]]:
    """Every k-gram (k = 1..4) of every caption, caption by caption, as tuples.

    One flat comprehension: this is the hot loop of CiderD.score, and
    per-caption generators cost more than the tuples themselves.
    """
    return [gram for words in words_X for k in range(1, _CIDER_N + 1)
            for gram in zip(*[words[i:] for i in range(k)])]


def _unique_counts(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys and their counts.

    Sorting by hand: numpy 2's ``np.unique`` without ``return_counts`` takes a
    hash-based path that is ~40x slower on a million int64 keys.
    """
    keys = np.sort(keys)
    is_first = np.empty(len(keys), dtype=bool)
    is_first[:1] = True
    is_first[1:] = keys[1:] != keys[:-1]
    starts = np.flatnonzero(is_first)
    counts = np.diff(np.append(starts, len(keys)))
    return keys[starts], counts


def _bigram_length(words: list[str]) -> int:
    """The caption length that CIDEr-D's Gaussian penalty compares.

    pycocoevalcap counts the n-grams of index ``n == 1``, i.e. bigrams, not
    words: ``len(words) - 1`` for a non-empty caption. Kept for parity,
    although a difference of two such lengths equals the difference of word
    counts whenever it matters (an empty caption has no n-gram to match).
    """
    return max(len(words) - 1, 0)


def _expand_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenates ``arange(s, s + c)`` for every (s, c) without a Python loop."""
    total = int(counts.sum())
    offsets = np.cumsum(counts) - counts  # where each range begins in the output
    return np.arange(total, dtype=np.int64) + np.repeat(starts - offsets, counts)


def _sum_by(index: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """``out[i] = sum(values[index == i])`` for i < size."""
    return np.bincount(index, weights=values, minlength=size)[:size]


class CiderD:
    """coco-caption's CIDEr (CIDEr-D) in-process, with precomputed document frequencies.

    Equals ``pycocoevalcap.cider.Cider().compute_score(gts, res)`` (to float
    rounding) when the candidates cover every image of ``references``: the same
    n-grams (1..4), document frequencies over the references' n-grams per image,
    ``log(number of images)`` as the reference length, clipped tf-idf cosine
    per n-gram order, a Gaussian length penalty (sigma 6) on the bigram-count
    difference, the mean over orders and references, times 10.

    The references are cooked once in the constructor; :meth:`score` only cooks
    the candidates and does vectorised numpy work, so it is cheap enough to call
    every evaluation step. When the candidates are a subset of the images, the
    document frequencies (and the reference length) still come from all of
    ``references``, like a fixed IDF corpus; pycocoevalcap would recompute them
    from the subset.

    Tokenisation: by default captions are lower-cased and split on whitespace,
    which on PTB-tokenised captions (what coco-caption feeds CIDEr) is the
    identity plus pycocoevalcap's own ``str.split()``. ``tokenize=True`` runs
    the PTB tokenizer of :func:`score_captions` (Java) on references once and
    on candidates at every :meth:`score` call, so raw captions score exactly as
    in :func:`score_captions`.

    Example:
        cider = CiderD({1: ['a dog runs', 'a brown dog'], 2: ['two cats sleep']})
        mean, per_image = cider.score({1: 'a dog', 2: 'a cat'})
    """

    def __init__(
        self,
        references: Mapping[Hashable, Sequence[str]],
        *,
        tokenize: bool = False,
        sigma: float = 6.0,
    ) -> None:
        """Cooks the references.

        Args:
            references: Image id -> one or more reference captions.
            tokenize: PTB-tokenise captions (needs Java) instead of the cheap
                lower-case + whitespace split.
            sigma: Standard deviation of the Gaussian length penalty.

        Raises:
            ValueError: If there are no references, an image has none, one
                is blank, or ``sigma <= 0``.
            TypeError: If references are not lists of strings.
            RuntimeError: If ``tokenize`` and Java is missing.
        """
        if not references:
            raise ValueError('Nothing to score: references are empty.')
        if not sigma > 0:
            raise ValueError(f'Need sigma > 0, got {sigma}.')
        _check_references(references)
        self._tokenize, self._sigma = tokenize, sigma
        self._index = {image_id: i for i, image_id in enumerate(references)}
        num_refs_I = np.array([len(refs) for refs in references.values()], dtype=np.int64)
        self._num_refs_I = num_refs_I
        self._ref_start_I = np.cumsum(num_refs_I) - num_refs_I
        # pycocoevalcap's ref_len: log of the number of images (0 for one image).
        self._log_num_images = math.log(float(len(references)))
        words = _split_words([r for refs in references.values() for r in refs], tokenize)
        self._cook_references(words)

    @property
    def num_images(self) -> int:
        """How many images the references describe (the IDF corpus size)."""
        return len(self._index)

    def _cook_references(self, words_R: list[list[str]]) -> None:
        """Builds the n-gram vocabulary, IDF and sparse tf-idf vectors of all references."""
        grams = _all_ngrams(words_R)
        self._vocab = {g: i for i, g in enumerate(dict.fromkeys(grams))}
        num_grams = len(self._vocab)
        self._order_G = np.fromiter((len(g) - 1 for g in self._vocab), np.int64, num_grams)
        gids_E = np.array(list(map(self._vocab.__getitem__, grams)), dtype=np.int64)
        rows_E = self._rows(words_R)
        # Document frequency: the number of images whose references contain the n-gram.
        image_of_ref = np.repeat(np.arange(self.num_images, dtype=np.int64), self._num_refs_I)
        image_grams, _ = _unique_counts(image_of_ref[rows_E] * num_grams + gids_E)
        df_G = np.bincount(image_grams % num_grams, minlength=num_grams).astype(np.float64)
        self._idf_G = self._log_num_images - np.log(np.maximum(1.0, df_G))
        # Sparse term frequencies, keyed ref * num_grams + gram and sorted for searchsorted.
        self._ref_keys, tf = _unique_counts(rows_E * num_grams + gids_E)
        self._ref_weights = tf * self._idf_G[self._ref_keys % num_grams]
        num_refs = len(words_R)
        self._ref_norm_RxN = self._norms(self._ref_keys // num_grams,
                                         self._order_G[self._ref_keys % num_grams],
                                         self._ref_weights, num_refs)
        self._ref_len_R = np.array([_bigram_length(w) for w in words_R], np.float64)

    def _rows(self, words_X: list[list[str]]) -> np.ndarray:
        """The caption index of every n-gram, in the order of ``_all_ngrams``."""
        lengths = np.array([len(words) for words in words_X], dtype=np.int64)
        # A caption of L words has max(L - k + 1, 0) k-grams.
        counts = np.maximum(lengths[:, None] - np.arange(_CIDER_N)[None, :], 0).sum(axis=1)
        return np.repeat(np.arange(len(words_X), dtype=np.int64), counts)

    def _norms(self, rows: np.ndarray, orders: np.ndarray, weights: np.ndarray,
               num_rows: int) -> np.ndarray:
        """Euclidean norm of each row's tf-idf vector, per n-gram order: (num_rows, 4)."""
        squares = _sum_by(rows * _CIDER_N + orders, weights**2, num_rows * _CIDER_N)
        return np.sqrt(squares).reshape(num_rows, _CIDER_N)

    def _cook_candidates(self, words_C: list[list[str]]):
        """Sparse tf-idf of the candidates: (rows, gram ids, orders, weights).

        N-grams absent from every reference get ids past the vocabulary; their
        document frequency is 0, so their IDF is log(num_images) as in
        pycocoevalcap (``max(1.0, df)``). They never match a reference but
        still count in the candidate's norm.
        """
        num_grams = len(self._vocab)
        grams = _all_ngrams(words_C)
        gids = np.array(list(map(self._vocab.get, grams, itertools.repeat(-1, len(grams)))),
                        dtype=np.int64)
        # Distinct ids for unseen n-grams, so repeats within a caption add up to their tf.
        missing = np.flatnonzero(gids < 0)
        unseen: dict[tuple[str, ...], int] = {}
        gids[missing] = [unseen.setdefault(grams[e], num_grams + len(unseen))
                         for e in missing.tolist()]
        all_grams = num_grams + len(unseen)
        keys, tf = _unique_counts(self._rows(words_C) * all_grams + gids)
        rows_E, gids_E = keys // all_grams, keys % all_grams
        unseen_order = np.fromiter((len(g) - 1 for g in unseen), np.int64, len(unseen))
        orders_E = np.concatenate([self._order_G, unseen_order])[gids_E]
        unseen_idf = np.full(len(unseen), self._log_num_images)
        idf_E = np.concatenate([self._idf_G, unseen_idf])[gids_E]
        return rows_E, gids_E, orders_E, tf * idf_E

    def _image_indices(self, candidates: Mapping[Hashable, str]) -> np.ndarray:
        if not candidates:
            raise ValueError('Nothing to score: candidates are empty.')
        _check_candidates(candidates)
        unknown = set(candidates) - set(self._index)
        if unknown:
            raise ValueError(
                f'{len(unknown)} candidate id(s) have no references ({_format_ids(unknown)}).'
            )
        return np.array([self._index[i] for i in candidates], dtype=np.int64)

    def score(self, candidates: Mapping[Hashable, str]) -> tuple[float, np.ndarray]:
        """CIDEr-D of each candidate against its image's references.

        Args:
            candidates: Image id -> generated caption, for all or some of the
                reference images. Empty captions are allowed and score 0.

        Returns:
            ``(mean, per_image)``: the mean score and a float64 array of
            per-image scores in the iteration order of ``candidates``.

        Raises:
            ValueError: If ``candidates`` is empty or has an id without
                references.
            TypeError: If a caption is not a string.
            RuntimeError: If tokenising with Java fails.
        """
        image_C = self._image_indices(candidates)
        words_C = _split_words(list(candidates.values()), self._tokenize)
        rows_E, gids_E, orders_E, weights_E = self._cook_candidates(words_C)
        num_cands = len(words_C)
        norm_CxN = self._norms(rows_E, orders_E, weights_E, num_cands)
        len_C = np.array([_bigram_length(w) for w in words_C], np.float64)

        # One "pair" per (candidate, one of its image's references).
        refs_C = self._num_refs_I[image_C]
        pair_start_C = np.cumsum(refs_C) - refs_C
        pair_cand_P = np.repeat(np.arange(num_cands, dtype=np.int64), refs_C)
        pair_ref_P = _expand_ranges(self._ref_start_I[image_C], refs_C)
        dot_PxN = self._clipped_dots(rows_E, gids_E, orders_E, weights_E, refs_C,
                                     pair_start_C, pair_ref_P)

        norm_ref_PxN = self._ref_norm_RxN[pair_ref_P]
        norm_hyp_PxN = norm_CxN[pair_cand_P]
        # pycocoevalcap divides only when both norms are non-zero (the dot is 0 otherwise).
        both = (norm_hyp_PxN != 0) & (norm_ref_PxN != 0)
        cos_PxN = np.where(both, dot_PxN / np.where(both, norm_hyp_PxN * norm_ref_PxN, 1.0),
                           dot_PxN)
        delta_P = len_C[pair_cand_P] - self._ref_len_R[pair_ref_P]
        penalty_P = np.exp(-(delta_P**2) / (2 * self._sigma**2))
        per_pair = (cos_PxN * penalty_P[:, None]).mean(axis=1)
        per_image = _sum_by(pair_cand_P, per_pair, num_cands) / refs_C * 10.0
        return float(per_image.mean()), per_image

    def _clipped_dots(self, rows_E, gids_E, orders_E, weights_E, refs_C, pair_start_C,
                      pair_ref_P) -> np.ndarray:
        """Sum of min(hyp, ref) * ref over the candidate's n-grams, per pair and order."""
        num_grams = len(self._vocab)
        num_pairs = len(pair_ref_P)
        if num_grams == 0:  # every reference tokenised to nothing (e.g. only punctuation)
            return np.zeros((num_pairs, _CIDER_N))
        seen = gids_E < num_grams  # unseen n-grams have a reference weight of 0
        rows_E, gids_E, orders_E, weights_E = (
            x[seen] for x in (rows_E, gids_E, orders_E, weights_E))
        # Each candidate n-gram meets every reference of its image.
        copies_E = refs_C[rows_E]
        entry_M = np.repeat(np.arange(len(rows_E), dtype=np.int64), copies_E)
        pair_M = _expand_ranges(pair_start_C[rows_E], copies_E)
        keys_M = pair_ref_P[pair_M] * num_grams + gids_E[entry_M]
        # Clip so that keys past the last one compare against a real (different) key.
        pos_M = np.minimum(np.searchsorted(self._ref_keys, keys_M), len(self._ref_keys) - 1)
        found_M = self._ref_keys[pos_M] == keys_M
        ref_w_M = np.where(found_M, self._ref_weights[pos_M], 0.0)
        hyp_w_M = weights_E[entry_M]
        contrib_M = np.minimum(hyp_w_M, ref_w_M) * ref_w_M
        dots = _sum_by(pair_M * _CIDER_N + orders_E[entry_M], contrib_M, num_pairs * _CIDER_N)
        return dots.reshape(num_pairs, _CIDER_N)
