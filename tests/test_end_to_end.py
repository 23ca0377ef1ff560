"""The whole job on the tiny config: train -> checkpoint -> resume -> eval -> caption."""

import io
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from jaxcap import decode, inference, metrics, train
from jaxcap.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(tfds_dir):
    config = tiny.get_config()
    config.data.tfds_dir = str(tfds_dir)
    return config


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp('e2e')
    config = _config(root / 'tfds')
    workdir = str(root / 'run')
    scores = train.train_and_evaluate(config, workdir)
    return config, workdir, scores


def test_workdir_holds_the_contracted_files(trained):
    config, workdir, scores = trained
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '6']
    with open(os.path.join(workdir, 'config.json')) as f:
        assert json.load(f)['train']['num_steps'] == 6
    with open(os.path.join(workdir, 'run_info.json')) as f:
        info = json.load(f)
    assert info['seed'] == 0 and info['device_count'] == 8 and info['packages']['jax'] == jax.__version__
    with open(os.path.join(workdir, 'vocab.json')) as f:
        assert json.load(f)['itos'][:4] == ['<pad>', '<unk>', '<start>', '<end>']
    with open(os.path.join(workdir, 'eval', 'val_metrics.json')) as f:
        saved = json.load(f)
    assert list(saved) == ['greedy'] and set(saved['greedy']) == set(metrics.METRIC_NAMES)
    assert saved['greedy'] == pytest.approx(scores['greedy'])
    with open(os.path.join(workdir, 'eval', 'val_captions.json')) as f:
        captions = json.load(f)
    # Every val image exactly once, although 10 images fill 3 padded batches of 4.
    assert len(captions) == config.data.num_val
    assert len({c['image_id'] for c in captions}) == config.data.num_val
    heatmaps = os.listdir(os.path.join(workdir, 'eval', 'heatmaps'))
    assert len(heatmaps) == 1 and Image.open(os.path.join(workdir, 'eval', 'heatmaps', heatmaps[0]))
    with open(os.path.join(workdir, 'eval', 'val_report.html')) as f:
        assert f'heatmaps/{heatmaps[0]}' in f.read()  # the report links the heatmap
    assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(trained, tmp_path):
    config, workdir, _ = trained
    resumed = str(tmp_path / 'resumed')
    shutil.copytree(workdir, resumed)
    # As if the run had died after step 3: only the step-3 checkpoint survives.
    shutil.rmtree(os.path.join(resumed, 'checkpoints', '6'))
    train.train_and_evaluate(config, resumed)
    *_, uninterrupted = inference.restore(workdir)
    *_, continued = inference.restore(resumed)
    jax.tree.map(np.testing.assert_array_equal, uninterrupted, continued)


def test_eval_mode_reproduces_the_training_run_scores(trained):
    _, workdir, scores = trained
    assert inference.evaluate_workdir(workdir)['greedy'] == pytest.approx(scores['greedy'])


def test_caption_mode_captions_good_images_and_reports_bad_ones(trained, tmp_path):
    config, workdir, _ = trained
    record = pipeline.load_source(config.data, 'test')[0]
    good = tmp_path / 'scene.png'
    Image.fromarray(np.asarray(record['image'])).save(good)
    big = tmp_path / 'big.jpg'   # another size: resized on the way in
    Image.fromarray(np.asarray(record['image'])).resize((100, 70)).save(big)
    text_file = tmp_path / 'notes.png'
    text_file.write_text('not an image')
    missing = tmp_path / 'missing.jpg'
    out = io.StringIO()
    heatmaps = tmp_path / 'heatmaps'
    inference.caption_images(workdir, [str(good), str(missing), str(text_file), str(tmp_path), str(big)],
                             str(heatmaps), out=out)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line['image'] for line in lines] == [str(good), str(missing), str(text_file),
                                                 str(tmp_path), str(big)]
    for line in (lines[0], lines[4]):
        assert isinstance(line['caption'], str) and np.isfinite(line['score']) and 'error' not in line
        assert os.path.exists(line['heatmap'])
    for line in lines[1:4]:
        assert 'caption' not in line and line['image'] in line['error']
    assert len(os.listdir(heatmaps)) == 2


def test_eval_on_an_empty_workdir_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match='not a trained jaxcap workdir'):
        inference.evaluate_workdir(str(tmp_path))


def test_resuming_with_another_model_is_refused_and_keeps_checkpoints(trained, tmp_path):
    config, workdir, _ = trained
    other = str(tmp_path / 'other')
    shutil.copytree(workdir, other)
    changed = config.copy_and_resolve_references()
    changed.model.units = 64
    with pytest.raises(ValueError, match=r'model.units: saved 32, now 64'):
        train.train_and_evaluate(changed, other)
    assert sorted(os.listdir(os.path.join(other, 'checkpoints'))) == ['3', '6']
    with open(os.path.join(other, 'config.json')) as f:
        assert json.load(f)['model']['units'] == 32


def test_a_config_typo_fails_naming_the_key(tmp_path):
    result = subprocess.run(
        [sys.executable, 'launch.py', '--config=configs/tiny.py', '--config.train.batch_sise=4',
         f'--workdir={tmp_path}'], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert 'batch_sise' in result.stderr
    assert not os.listdir(tmp_path)   # nothing written


def test_beam_search_from_the_command_line_flags(trained, tmp_path):
    config, workdir, _ = trained
    record = pipeline.load_source(config.data, 'test')[1]
    image = tmp_path / 'scene.png'
    Image.fromarray(np.asarray(record['image'])).save(image)
    out = io.StringIO()
    [line] = inference.caption_images(workdir, [str(image)], out=out, beam_size=3)
    # The score is the caption's own log-probability under the model.
    _, vocab, model, variables = inference.restore(workdir)
    tokens = np.asarray(vocab.encode(line['caption'], config.model.max_decode_len + 1)[1:])[None]
    image_batch = pipeline._sized(np.asarray(record['image']), config.data.image_size)[None]
    expected = decode.sequence_log_prob(model, variables, image_batch, tokens)
    np.testing.assert_allclose(line['score'], float(expected[0]), rtol=1e-4, atol=1e-4)
