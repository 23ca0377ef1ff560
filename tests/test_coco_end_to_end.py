"""The COCO path end to end on the mock coco_captions build: extract, train, evaluate.

The mock holds odd-sized RGB, grayscale and CMYK JPEGs (see test_coco.py).
"""

import json
import os

import numpy as np
import pytest

from jaxcap import checkpoint, inference, train
from jaxcap.data import features
from test_coco import mock_coco_dir, tiny_coco_config  # noqa: F401,F811 (a fixture)


@pytest.fixture(scope='module')
def cached_run(mock_coco_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp('coco')
    config = tiny_coco_config(mock_coco_dir)
    config.model.encoder.train_stages = 0
    config.data.features_dir = str(root / 'features')
    config.train.validate_every_steps = 2
    config.train.batch_size = 8   # the 8 fake devices; the whole 8-image subset
    dirs = inference.extract_features(config)
    workdir = str(root / 'run')
    scores = train.train_and_evaluate(config, workdir)
    return config, dirs, workdir, scores


def test_extraction_caches_the_training_subset_and_the_eval_split(cached_run):
    config, dirs, _, _ = cached_run
    assert [os.path.basename(d) for d in dirs] == ['train+restval', 'val']
    # train+restval = 16 mock images, halved by data.train_fraction; val has 5.
    with open(os.path.join(dirs[0], features.INDEX_FILE)) as f:
        assert json.load(f)['num_records'] == 8
    with open(os.path.join(dirs[1], features.INDEX_FILE)) as f:
        assert json.load(f)['num_records'] == 5


def test_training_on_the_cache_evaluates_greedy_and_beam(cached_run):
    config, _, workdir, scores = cached_run
    assert set(scores) == {'greedy', 'beam2'}
    assert all(set(s) >= {'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr'} for s in scores.values())
    with open(os.path.join(workdir, 'eval', 'val_metrics.json')) as f:
        saved = json.load(f)
    assert {name: pytest.approx(s) for name, s in saved.items()} == scores
    for name in ('val_captions.json', 'val_captions_beam2.json'):
        with open(os.path.join(workdir, 'eval', name)) as f:
            captions = json.load(f)
        assert len({c['image_id'] for c in captions}) == 5  # every val image once
    # Cached grids carry no pixels: the report has captions but no heatmaps.
    with open(os.path.join(workdir, 'eval', 'val_report.html')) as f:
        page = f.read()
    assert 'beam2' in page and 'greedy' in page


def test_validation_during_training_ranks_the_checkpoints(cached_run):
    config, _, workdir, _ = cached_run
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), 2, 2,
                                           keep_best=True)
    steps = checkpointer.all_steps()
    assert steps == [2, 4]  # validated every 2 steps, each with its checkpoint
    cider = {s: checkpointer.metrics(s)['CIDEr'] for s in steps}
    assert all(np.isfinite(v) and v >= 0 for v in cider.values())
    assert checkpointer.best_step() == max(steps, key=lambda s: (cider[s], s))  # newest of equals
    checkpointer.close()
