"""Caption cleaning and the vocabulary."""

import numpy as np
import pytest

from jaxcap.data import text


def test_clean_caption_matches_the_reference_rules():
    # Lowercase, every non-alphanumeric becomes a separator, whitespace collapses.
    assert text.clean_caption('A Man, riding a HORSE!  (2 legs)') == [
        'a', 'man', 'riding', 'a', 'horse', '2', 'legs']
    assert text.clean_caption("it's") == ['it', 's']
    assert text.clean_caption(' ... ') == []


def test_vocabulary_ranks_by_frequency_and_breaks_ties_alphabetically():
    vocab = text.Vocabulary.build(['b a c', 'a b', 'a d', 'zz yy'], max_words=3)
    # counts: a=3, b=2, then c, d, yy, zz all 1 -> alphabetical tie-break keeps 'c'.
    assert vocab.itos == ['<pad>', '<unk>', '<start>', '<end>', 'a', 'b', 'c']
    reversed_order = text.Vocabulary.build(['zz yy', 'a d', 'a b', 'b a c'], max_words=3)
    assert reversed_order == vocab


def test_encode_pads_truncates_and_maps_unknown_words():
    vocab = text.Vocabulary(['a', 'red', 'circle'])
    # ids: a=4, red=5, circle=6; 'blue' is unknown (1).
    np.testing.assert_array_equal(vocab.encode('A red, blue circle', 8), [2, 4, 5, 1, 6, 3, 0, 0])
    # Too long: the tail goes, <end> stays.
    np.testing.assert_array_equal(vocab.encode('a red circle a red', 5), [2, 4, 5, 6, 3])
    assert vocab.encode('a', 4).dtype == np.int32
    with pytest.raises(ValueError, match='max_len'):
        vocab.encode('a', 1)


def test_decode_stops_at_end_and_skips_start():
    vocab = text.Vocabulary(['a', 'red', 'circle'])
    assert vocab.decode([2, 4, 5, 6, 3, 5, 5]) == 'a red circle'
    assert vocab.decode([4, 0, 5]) == 'a'


def test_vocabulary_round_trip_through_json(tmp_path):
    vocab = text.Vocabulary.build(['two red circles', 'a blue square left of a red circle'], 100)
    path = tmp_path / 'vocab.json'
    vocab.save(path)
    loaded = text.Vocabulary.load(path)
    assert loaded == vocab
    caption = 'a blue square left of two red circles'
    assert loaded.decode(loaded.encode(caption, 20)) == caption


def test_loading_a_file_that_is_not_a_vocabulary_fails(tmp_path):
    path = tmp_path / 'other.json'
    path.write_text('{"itos": ["x", "y", "z", "w", "a"]}')
    with pytest.raises(ValueError, match='not a jaxcap vocabulary'):
        text.Vocabulary.load(path)
