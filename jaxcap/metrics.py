"""Official COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D).

Scores come from ``pycocoevalcap`` (the pip package of coco-caption), so the
numbers are comparable with published results. Captions are tokenised with the
same Stanford PTB tokenizer jar and punctuation list that coco-caption uses.

Notes:
    * SPICE is not reported: it needs Stanford CoreNLP model jars that
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
import os
import shutil
import subprocess
from collections.abc import Hashable, Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

METRIC_NAMES = ('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr')

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


def _check_captions(
    references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str]
) -> None:
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
        if not isinstance(candidates[image_id], str):
            raise TypeError(
                f'candidates[{image_id!r}] must be a string, got {candidates[image_id]!r}.'
            )


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
        images.

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
