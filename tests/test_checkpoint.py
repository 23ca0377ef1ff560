"""Checkpointer: fallback from a damaged latest step, tmp dirs, last-N + best retention, bad dirs."""

import json
import logging
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcap import checkpoint

# What a save killed before its final rename leaves behind (orbax 0.12).
TMP_SUFFIX = '.orbax-checkpoint-tmp'


def _state(step):
    # 64x64 random floats: incompressible, so the array data is the biggest file of a step.
    return {'params': {'w': jax.random.normal(jax.random.key(step), (64, 64)),
                       'b': jnp.arange(3.0) + step},
            'step': jnp.asarray(step, jnp.int32)}


def _iterator():
    return iter(grain.MapDataset.range(1000).seed(0).shuffle().batch(4).to_iter_dataset())


def _batch_after(step):
    """The batch a fresh iterator yields after `step` batches: what a resume at `step` must yield."""
    it = _iterator()
    for _ in range(step):
        next(it)
    return next(it)


def _save_steps(directory, steps, metrics=None, **kwargs):
    """Saves `_state(s)` for s in 1..steps (the iterator advanced s batches); returns the steps kept."""
    ckpt = checkpoint.Checkpointer(directory, 1, kwargs.pop('max_to_keep', 5), **kwargs)
    it = _iterator()
    for step in range(1, steps + 1):
        next(it)
        assert ckpt.save(step, _state(step), it, (metrics or {}).get(step))
    ckpt.close()
    return ckpt.all_steps()


def _restore(directory, step=None, **kwargs):
    """(restored state, the iterator's next batch, checkpointer) from a new Checkpointer."""
    ckpt = checkpoint.Checkpointer(directory, 1, kwargs.pop('max_to_keep', 5), **kwargs)
    it = _iterator()
    state = ckpt.restore(_state(0), it, step=step)
    return state, next(it), ckpt


def _assert_is_step(state, next_batch, step):
    jax.tree.map(np.testing.assert_array_equal, state, _state(step))
    np.testing.assert_array_equal(next_batch, _batch_after(step))


def _truncate(path, size):
    with open(path, 'r+b') as f:
        f.truncate(size)


def _truncate_array_file(step_dir):
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, 'state')) for f in fs]
    biggest = max(files, key=os.path.getsize)
    _truncate(biggest, os.path.getsize(biggest) // 2)


DAMAGES = {
    'array file truncated': _truncate_array_file,
    'state metadata truncated': lambda d: _truncate(os.path.join(d, 'state', '_METADATA'), 9),
    'iterator state deleted': lambda d: os.remove(os.path.join(d, 'data', 'process_0-of-1.json')),
    'state item deleted': lambda d: shutil.rmtree(os.path.join(d, 'state')),
    # Orbax cannot even list the steps with this one.
    'metrics file truncated': lambda d: _truncate(os.path.join(d, 'metrics', 'metrics'), 3),
}


@pytest.mark.parametrize('damage', DAMAGES)
def test_a_damaged_latest_step_falls_back_to_the_previous_one_and_is_kept(tmp_path, caplog, damage):
    directory = str(tmp_path / 'ckpt')
    _save_steps(directory, 3)
    DAMAGES[damage](os.path.join(directory, '3'))
    with caplog.at_level(logging.WARNING):
        state, next_batch, ckpt = _restore(directory)
    _assert_is_step(state, next_batch, 2)
    warning = ' '.join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert 'step 3' in warning and 'restored step 2' in warning, warning
    moved = os.path.join(directory, 'corrupt-3')
    assert moved in warning and os.listdir(moved)   # kept for inspection, not deleted
    # The resumed run saves step 3 again: the damaged one is not in its way.
    assert ckpt.all_steps() == [1, 2]
    it = _iterator()
    for _ in range(3):
        next(it)
    assert ckpt.save(3, _state(3), it)
    ckpt.close()
    _assert_is_step(*_restore(directory)[:2], 3)


def test_a_step_damaged_again_is_moved_to_a_fresh_name(tmp_path):
    directory = str(tmp_path / 'ckpt')
    os.makedirs(os.path.join(directory, 'corrupt-3'))
    _save_steps(directory, 3)
    _truncate_array_file(os.path.join(directory, '3'))
    _assert_is_step(*_restore(directory)[:2], 2)
    assert sorted(os.listdir(directory)) == ['1', '2', 'corrupt-3', 'corrupt-3.1']


def test_a_leftover_tmp_dir_of_a_killed_save_is_ignored(tmp_path, caplog):
    directory = str(tmp_path / 'ckpt')
    _save_steps(directory, 2)
    tmp = os.path.join(directory, '3' + TMP_SUFFIX)
    shutil.copytree(os.path.join(directory, '2'), tmp)
    shutil.rmtree(os.path.join(tmp, 'data'))    # half written
    with caplog.at_level(logging.WARNING):
        state, next_batch, ckpt = _restore(directory)
    assert ckpt.latest_step() == 2
    _assert_is_step(state, next_batch, 2)
    assert not [r for r in caplog.records if 'jaxcap' in r.pathname and r.levelno >= logging.WARNING]
    it = _iterator()
    for _ in range(3):
        next(it)
    assert ckpt.save(3, _state(3), it)   # the same step again, over the leftover
    ckpt.close()
    _assert_is_step(*_restore(directory)[:2], 3)


def test_nothing_restorable_fails_clearly_and_moves_nothing(tmp_path):
    directory = str(tmp_path / 'ckpt')
    _save_steps(directory, 2)
    ckpt = checkpoint.Checkpointer(directory, 1, 5)
    other_model = {'params': {'w': jnp.zeros((8, 8))}, 'step': jnp.zeros((), jnp.int32)}
    with pytest.raises(ValueError, match=r'Could not restore a checkpoint from .*step 2: .*step 1: '):
        ckpt.restore(other_model)
    assert sorted(os.listdir(directory)) == ['1', '2']
    with pytest.raises(FileNotFoundError, match='No checkpoint at step 7'):
        ckpt.restore(_state(0), step=7)


def test_keeps_the_newest_n_and_the_best_across_restarts(tmp_path):
    directory = str(tmp_path / 'ckpt')
    # The best CIDEr comes early (step 2); later steps are worse or have no metric.
    metrics = {2: {'CIDEr': 0.9, 'loss': 1.0}, 3: {'CIDEr': 0.5}, 5: {'CIDEr': 0.7}}
    assert _save_steps(directory, 6, metrics, max_to_keep=2, keep_best=True) == [2, 5, 6]
    # A new instance (a restarted run) reads the metrics back from the checkpoints.
    ckpt = checkpoint.Checkpointer(directory, 1, 2, keep_best=True)
    assert ckpt.best_step() == 2 and ckpt.metrics(2) == {'CIDEr': 0.9, 'loss': 1.0}
    it = _iterator()
    for step in (7, 8):
        assert ckpt.save(step, _state(step), it)
    assert ckpt.all_steps() == [2, 7, 8] and ckpt.best_step() == 2
    assert ckpt.save(9, _state(9), it, {'CIDEr': 1.5})   # a new best: the old one may go
    assert ckpt.all_steps() == [8, 9] and ckpt.best_step() == 9
    ckpt.close()


def test_without_keep_best_only_the_newest_are_kept(tmp_path):
    directory = str(tmp_path / 'ckpt')
    metrics = {2: {'CIDEr': 0.9}, 5: {'CIDEr': 0.7}}
    assert _save_steps(directory, 6, metrics, max_to_keep=2) == [5, 6]
    assert checkpoint.Checkpointer(directory, 1, 2).best_step() == 5


def test_best_step_is_none_without_the_metric(tmp_path):
    directory = str(tmp_path / 'ckpt')
    _save_steps(directory, 3, {2: {'loss': 0.1}}, keep_best=True)
    assert checkpoint.Checkpointer(directory, 1, 5, keep_best=True).best_step() is None


def test_restoring_the_best_step(tmp_path):
    directory = str(tmp_path / 'ckpt')
    _save_steps(directory, 5, {2: {'CIDEr': 2.0}, 4: {'CIDEr': 1.0}}, max_to_keep=2, keep_best=True)
    ckpt = checkpoint.Checkpointer(directory, 1, 2, keep_best=True)
    _assert_is_step(*_restore(directory, step=ckpt.best_step())[:2], 2)
    _assert_is_step(*_restore(directory)[:2], 5)


def test_a_file_where_the_checkpoint_directory_should_be_fails_naming_it(tmp_path):
    path = tmp_path / 'checkpoints'
    path.write_text('not a directory')
    with pytest.raises(NotADirectoryError, match=f'{path} is a file.*Move the file away'):
        checkpoint.Checkpointer(str(path), 1, 2)
    with pytest.raises(NotADirectoryError, match=f'{path} is a file'):
        checkpoint.Checkpointer(str(path / 'checkpoints'), 1, 2)   # the workdir itself is a file
    assert path.read_text() == 'not a directory'


def test_a_directory_without_access_fails_naming_it_and_the_fix(tmp_path, monkeypatch):
    # The same check as above, where the tests run as root: os.access says no.
    path = tmp_path / 'run' / 'checkpoints'
    real_access = os.access
    monkeypatch.setattr(os, 'access', lambda p, mode: str(p) != str(tmp_path) and real_access(p, mode))
    with pytest.raises(PermissionError, match=f'{path} need read and write access to {tmp_path}\\. '
                                              f'.*chmod u\\+rwx {tmp_path}'):
        checkpoint.Checkpointer(str(path), 1, 2)
    assert not (tmp_path / 'run').exists()


def test_bad_settings_fail_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match='every_steps'):
        checkpoint.Checkpointer(str(tmp_path), 0, 2)
    with pytest.raises(ValueError, match='max_to_keep'):
        checkpoint.Checkpointer(str(tmp_path), 1, 0)


def test_metrics_are_stored_as_json_floats(tmp_path):
    directory = str(tmp_path / 'ckpt')
    _save_steps(directory, 1, {1: {'CIDEr': np.float32(0.5), 'Bleu_4': jnp.asarray(0.25)}})
    with open(os.path.join(directory, '1', 'metrics', 'metrics')) as f:
        assert json.load(f) == {'CIDEr': 0.5, 'Bleu_4': 0.25}


def test_saving_a_step_again_is_a_no_op(tmp_path):
    # A resumed run's loop reaches the step it restored: that checkpoint stays as it was.
    directory = str(tmp_path / 'ckpt')
    _save_steps(directory, 2)
    ckpt = checkpoint.Checkpointer(directory, 1, 5)
    assert not ckpt.save(2, _state(99), _iterator())
    ckpt.close()
    _assert_is_step(*_restore(directory)[:2], 2)
