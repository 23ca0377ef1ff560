"""TensorBoard event files written without TensorFlow, read back by TensorFlow's own reader."""

import os

import pytest
from tensorboard.plugins.hparams import metadata as hparams_metadata

from jaxcap import summaries


def _events(path):
    import tensorflow as tf  # the reader checks every record's length and CRCs
    return list(tf.compat.v1.train.summary_iterator(str(path)))


def test_scalars_texts_and_hyperparameters_read_back_by_tensorflow(tmp_path):
    writer = summaries.create_writer(tmp_path)
    writer.write_hparams({'optim.learning_rate': 0.001, 'model.dtype': 'float32', 'seed': 7,
                          'train.donate': True})
    writer.write_scalars(10, {'loss': 2.5, 'examples_per_s': 123})
    writer.write_texts(20, {'val/samples': 'a red circle\n\ntwo squares'})
    writer.close()
    [name] = os.listdir(tmp_path)
    assert name.startswith('events.out.tfevents.') and f'.{os.getpid()}.' in name
    first, hparams, scalars, texts = _events(tmp_path / name)
    assert first.file_version == 'brain.Event:2'

    [value] = hparams.summary.value
    assert value.metadata.plugin_data.plugin_name == 'hparams'
    start = hparams_metadata.parse_session_start_info_plugin_data(value.metadata.plugin_data.content)
    assert start.hparams['optim.learning_rate'].number_value == 0.001
    assert start.hparams['model.dtype'].string_value == 'float32'
    assert start.hparams['seed'].number_value == 7
    assert start.hparams['train.donate'].bool_value is True

    assert scalars.step == 10
    assert {v.tag: v.simple_value for v in scalars.summary.value} == {'loss': 2.5, 'examples_per_s': 123}
    assert texts.step == 20
    [text] = texts.summary.value
    assert (text.tag, text.metadata.plugin_data.plugin_name) == ('val/samples', 'text')
    assert text.tensor.string_val == [b'a red circle\n\ntwo squares']


def test_every_write_reaches_the_file_before_close(tmp_path):
    """A run killed between log points keeps what it logged."""
    writer = summaries.create_writer(tmp_path)
    writer.write_scalars(1, {'loss': 3.0})
    [name] = os.listdir(tmp_path)
    assert [v.simple_value for e in _events(tmp_path / name) for v in e.summary.value] == [3.0]
    writer.close()


def test_two_writers_in_one_second_write_two_files(tmp_path):
    first, second = summaries.create_writer(tmp_path), summaries.create_writer(tmp_path)
    first.write_scalars(1, {'loss': 1.0})
    second.write_scalars(1, {'loss': 2.0})
    first.close()
    second.close()
    losses = sorted(v.simple_value for name in os.listdir(tmp_path)
                    for e in _events(tmp_path / name) for v in e.summary.value)
    assert losses == [1.0, 2.0]


def test_other_hosts_only_log(tmp_path, caplog):
    writer = summaries.create_writer(tmp_path / 'run', just_logging=True)
    with caplog.at_level('INFO'):
        writer.write_scalars(5, {'loss': 1.5})
    writer.close()
    assert not (tmp_path / 'run').exists()
    assert '[5] loss=1.5' in caplog.text


@pytest.mark.parametrize('module', ['jaxcap.train', 'jaxcap.inference'])
def test_training_and_inference_do_not_import_tensorflow(module, tensorflow_modules_after):
    """TensorFlow costs ~4 s of start-up, and GPU/TPU machines may not have it."""
    assert tensorflow_modules_after(f'import {module}') == []
