"""Caption text: cleaning as the reference did, and a frequency-ranked vocabulary.

The reference lowercased captions, dropped every non-alphanumeric character and
wrapped each caption in `startseq` / `endseq`. Here the start and end markers are
reserved vocabulary ids instead of words, so they can never collide with a word
of the data set and the decoder knows them by number.
"""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

PAD, UNK, START, END = 0, 1, 2, 3
SPECIAL_TOKENS = ('<pad>', '<unk>', '<start>', '<end>')

_NON_ALNUM = re.compile(r'[^a-z0-9 ]+')
_SPACES = re.compile(r'\s+')


def clean_caption(text: str) -> list[str]:
    """Lowercases, replaces non-alphanumerics by spaces and splits into words."""
    text = _NON_ALNUM.sub(' ', text.lower())
    return _SPACES.sub(' ', text).strip().split(' ') if text.strip() else []


class Vocabulary:
    """Maps words to ids: pad=0, unk=1, start=2, end=3, then words by frequency."""

    def __init__(self, words: Sequence[str]):
        if len(set(words)) != len(words):
            raise ValueError('Vocabulary words must be unique.')
        self.itos = list(SPECIAL_TOKENS) + [w for w in words]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, captions: Iterable[str], max_words: int) -> 'Vocabulary':
        """Keeps the `max_words` most frequent words; ties go to the earlier word alphabetically.

        Sorting ties by the word itself (not by first appearance) makes the
        vocabulary independent of the order in which captions are read.
        """
        counts = collections.Counter(w for c in captions for w in clean_caption(c))
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return cls([w for w, _ in ranked[:max_words]])

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def encode(self, caption: str, max_len: int) -> np.ndarray:
        """`<start> words <end>`, truncated and zero-padded to `max_len` ids (int32).

        A caption longer than `max_len - 2` words loses its tail but keeps `<end>`,
        so the model always learns to stop.
        """
        if max_len < 2:
            raise ValueError(f'max_len must be >= 2 (start and end tokens), got {max_len}.')
        ids = [self.stoi.get(w, UNK) for w in clean_caption(caption)][: max_len - 2]
        tokens = np.zeros((max_len,), np.int32)
        tokens[: len(ids) + 2] = [START, *ids, END]
        return tokens

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first `<end>` or `<pad>`; `<start>` is skipped."""
        words = []
        for i in ids:
            i = int(i)
            if i in (END, PAD):
                break
            if i != START:
                words.append(self.itos[i] if 0 <= i < len(self.itos) else SPECIAL_TOKENS[UNK])
        return ' '.join(words)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the words (special tokens included) as JSON, atomically."""
        tmp = f'{os.fspath(path)}.tmp'
        with open(tmp, 'w') as f:
            json.dump({'itos': self.itos}, f, indent=0)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> 'Vocabulary':
        with open(path) as f:
            itos = json.load(f)['itos']
        if tuple(itos[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f'{path} is not a jaxcap vocabulary (special tokens differ).')
        return cls(itos[len(SPECIAL_TOKENS):])
