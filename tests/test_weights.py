"""Tests for jaxcap.weights: Keras ResNet50 h5 files (both layouts) -> Flax, and back to disk.

Keras builds a randomly weighted ResNet50 once per module; its outputs, after
Keras' own caffe preprocessing, are the reference for our converted model fed
through `jaxcap.data.images.preprocess`.
"""

import os
import shutil

os.environ['KERAS_BACKEND'] = 'tensorflow'   # before keras is imported

import h5py
import jax
import keras
import numpy as np
import pytest
import skimage.data
from PIL import Image

from jaxcap import weights
from jaxcap.data.images import preprocess, resize
from jaxcap.models.resnet import ResNet50

STAGE_LAYERS = ('conv2_block3_out', 'conv3_block4_out', 'conv4_block6_out', 'conv5_block3_out')
SEED = 0
REL_TOL = 1e-4   # max abs error allowed, relative to the output's max abs value

# Keras' TF backend converts tensors with a NumPy-1-style __array__: noise, not our concern.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


# --------------------------------------------------------------------------- Keras side


def _randomise(model, rng):
    """Sets every weight to a seeded random value, keeping activations O(1) through 50 layers.

    Conv kernels are He-scaled (output scale ~ input scale); the stem's is
    divided further by the caffe inputs' ~64 pixel scale. Each residual
    branch's last BatchNorm gets a small gamma, so a block adds a little to its
    identity path instead of doubling its variance (16 blocks would grow
    activations ~256x and drown the biases and BatchNorm means). With
    activations O(1), every variable, BatchNorm statistics included, moves the
    output far beyond the test tolerance if it is dropped or mis-mapped.
    """
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kernel, bias = layer.get_weights()
            std = np.sqrt(2 / np.prod(kernel.shape[:3])) / (64 if layer.name == 'conv1_conv' else 1)
            layer.set_weights([rng.normal(0, std, kernel.shape), rng.normal(0, 0.1, bias.shape)])
        elif isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.get_weights()[0].shape
            gamma = rng.uniform(0.5, 1.5, shape) * (0.3 if layer.name.endswith('_3_bn') else 1)
            layer.set_weights([gamma,
                               rng.normal(0, 0.2, shape),         # beta
                               rng.normal(0, 1, shape),           # moving_mean
                               rng.uniform(0.5, 2, shape)])       # moving_variance


@pytest.fixture(scope='module')
def keras_model():
    model = keras.applications.ResNet50(weights=None, include_top=False,
                                        input_shape=(None, None, 3))
    _randomise(model, np.random.default_rng(SEED))
    return model


@pytest.fixture(scope='module')
def keras_stages(keras_model):
    """The Keras model with every stage's output as an output."""
    outputs = [keras_model.get_layer(name).output for name in STAGE_LAYERS]
    return keras.Model(keras_model.input, outputs)


def _strip_layer_names(path):
    """Removes the `name` attributes Keras 3.15 adds, as older Keras 3 files lack them."""
    with h5py.File(path, 'r+') as f:
        for group in f['layers'].values():
            if 'vars' in group:
                group['vars'].attrs.pop('name', None)


def _save_official_layout(keras_model, path):
    """Writes the legacy layout of the official ImageNet `..._notop.h5` by hand with h5py.

    That file (written by Keras 2) has a root `layer_names` attribute listing
    every layer, and per layer a group with a `weight_names` attribute and the
    datasets at `<layer>/<layer>/<var>:0`; Keras 3 can no longer write it.
    """
    short_names = {keras.layers.Conv2D: ('kernel', 'bias'),
                   keras.layers.BatchNormalization: ('gamma', 'beta', 'moving_mean',
                                                     'moving_variance')}
    with h5py.File(path, 'w') as f:
        f.attrs['layer_names'] = [layer.name.encode() for layer in keras_model.layers]
        f.attrs['backend'] = b'tensorflow'
        f.attrs['keras_version'] = b'2.2.4'
        for layer in keras_model.layers:
            group = f.create_group(layer.name)
            names = [f'{layer.name}/{short}:0'
                     for short in short_names.get(type(layer), ())[:len(layer.weights)]]
            group.attrs['weight_names'] = [n.encode() for n in names]
            for name, value in zip(names, layer.get_weights(), strict=True):
                group.create_dataset(name, data=value)


@pytest.fixture(scope='module')
def weight_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('keras_weights')


@pytest.fixture(scope='module')
def keras3_file(keras_model, weight_dir):
    path = str(weight_dir / 'resnet50.weights.h5')
    keras_model.save_weights(path)
    return path


@pytest.fixture(scope='module')
def weight_file(request, keras_model, keras3_file, weight_dir):
    """One file per layout, written by Keras itself."""
    layout = request.param
    if layout == 'keras3':
        return keras3_file
    path = str(weight_dir / f'{layout}.h5')
    if layout == 'keras3_unnamed':
        shutil.copy(keras3_file, path)
        _strip_layer_names(path)
    elif layout == 'legacy_keras3_model':
        keras_model.save(path)   # Keras 3's legacy h5: weights under model_weights/
    elif layout == 'legacy_official':
        _save_official_layout(keras_model, path)
    return path


@pytest.fixture(scope='module')
def legacy_file(keras_model, weight_dir):
    path = str(weight_dir / 'legacy_for_errors.h5')
    keras_model.save(path)
    return path


# --------------------------------------------------------------------------- inputs


def _photos():
    """Three real photographs (512x512, 300x451, 400x600), uint8 RGB."""
    return [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]


@pytest.fixture(scope='module')
def inputs():
    """uint8 RGB batches: photographs plus noise at 224x224, and a photo at 160x200."""
    noise = np.random.default_rng(SEED + 1).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    photos = np.stack([resize(photo, 224) for photo in _photos()])
    # A non-square, non-224 size: odd grids (25 -> 13 columns) test the padding arithmetic.
    astronaut = Image.fromarray(_photos()[0]).resize((200, 160), Image.Resampling.BILINEAR)
    return {'224x224': np.concatenate([photos, noise]),
            '160x200': np.asarray(astronaut)[None]}


@pytest.fixture(scope='module')
def keras_outputs(keras_stages, inputs):
    outputs = {}
    for name, images in inputs.items():
        x = keras.applications.resnet50.preprocess_input(images.astype(np.float32))
        outputs[name] = [np.asarray(y) for y in keras_stages(x, training=False)]
    return outputs


@pytest.fixture(scope='module')
def flax_stages():
    model = ResNet50()
    return jax.jit(lambda variables, images: model.apply(
        variables, preprocess(images, 'caffe'), train=False, return_stages=True))


# --------------------------------------------------------------------------- conversion


def _max_rel_error(ours, reference):
    return float(np.max(np.abs(np.asarray(ours) - reference)) / np.max(np.abs(reference)))


def test_keras_reference_is_finite_and_non_trivial(keras_outputs):
    for outputs in keras_outputs.values():
        for y in outputs:
            assert np.isfinite(y).all()
            active = np.mean(y > 0)        # post-ReLU: neither dead nor saturated
            assert 0.05 < active < 0.95, active
            assert 1e-3 < np.max(np.abs(y)) < 1e6


LAYOUTS = ['keras3', 'keras3_unnamed', 'legacy_keras3_model', 'legacy_official']


def _flax_module_path(layer_name):
    """'conv1_conv' -> ('conv1_conv',); 'conv2_block1_1_conv' -> ('conv2_block1', '1_conv')."""
    block, sep, rest = layer_name.partition('_block')
    if not sep:
        return (layer_name,)
    number, _, module = rest.partition('_')
    return (f'{block}_block{number}', module)


def _lookup(tree, path):
    for key in path:
        tree = tree[key]
    return tree


@pytest.mark.parametrize('weight_file', LAYOUTS, indirect=True)
def test_converted_weights_equal_keras_weights(weight_file, keras_model):
    variables = weights.load_keras_resnet50(weight_file)
    num_layers = 0
    for layer in keras_model.layers:
        if not layer.weights:
            continue
        num_layers += 1
        path = _flax_module_path(layer.name)
        params = _lookup(variables['params'], path)
        if isinstance(layer, keras.layers.Conv2D):
            ours = [params['kernel'], params['bias']]
        else:
            stats = _lookup(variables['batch_stats'], path)
            ours = [params['scale'], params['bias'], stats['mean'], stats['var']]
        for mine, theirs in zip(ours, layer.get_weights(), strict=True):
            assert mine.dtype == np.float32
            np.testing.assert_array_equal(mine, theirs, err_msg=layer.name)
    assert num_layers == 106
    assert len(jax.tree_util.tree_leaves(variables)) == 53 * 2 + 53 * 4


@pytest.mark.parametrize('weight_file', ['keras3', 'legacy_keras3_model', 'legacy_official'],
                         indirect=True)
@pytest.mark.parametrize('size', ['224x224', '160x200'])
def test_flax_matches_keras_per_stage(weight_file, size, inputs, keras_outputs, flax_stages):
    variables = weights.load_keras_resnet50(weight_file)
    ours = flax_stages(variables, inputs[size])
    for name, y, reference in zip(STAGE_LAYERS, ours, keras_outputs[size]):
        assert y.shape == reference.shape, name
        assert _max_rel_error(y, reference) < REL_TOL, name


def test_final_grid_matches_keras(keras3_file, keras_model, keras_outputs, inputs):
    """The default call (no return_stages) gives Keras' final (B, 7, 7, 2048) grid."""
    images = inputs['224x224']
    assert keras_model.output.name == keras_model.get_layer(STAGE_LAYERS[-1]).output.name
    reference = keras_outputs['224x224'][-1]
    variables = weights.load_keras_resnet50(keras3_file)
    ours = jax.jit(lambda v, x: ResNet50().apply(v, preprocess(x, 'caffe')))(variables, images)
    assert ours.shape == reference.shape == (len(images), 7, 7, 2048)
    assert _max_rel_error(ours, reference) < REL_TOL


# --------------------------------------------------------------------------- bad files


def _copy(source, tmp_path, name='copy.h5'):
    path = str(tmp_path / name)
    shutil.copy(source, path)
    return path


def _keras3_group_of(f, layer_name):
    """The `layers/<class>_i` key whose layer is `layer_name` in a Keras 3 file."""
    for key, group in f['layers'].items():
        if 'vars' in group and group['vars'].attrs.get('name') == layer_name:
            return key
    raise KeyError(layer_name)


def test_missing_file_names_the_path(tmp_path):
    path = str(tmp_path / 'absent.h5')
    with pytest.raises(FileNotFoundError, match='absent.h5'):
        weights.load_keras_resnet50(path)


def test_non_hdf5_file_is_rejected(tmp_path):
    path = tmp_path / 'weights.h5'
    path.write_text('<html>404 Not Found</html>')
    with pytest.raises(ValueError, match=r'weights\.h5.*not an HDF5 file'):
        weights.load_keras_resnet50(path)


def test_hdf5_file_without_keras_layout_is_rejected(tmp_path):
    path = str(tmp_path / 'other.h5')
    with h5py.File(path, 'w') as f:
        f['data'] = np.zeros(3)
    with pytest.raises(ValueError, match=r'other\.h5.*not Keras weights'):
        weights.load_keras_resnet50(path)


@pytest.mark.parametrize('kept', [0.001, 0.5, 0.999])
@pytest.mark.parametrize('layout', ['keras3', 'legacy'])
def test_truncated_file_names_the_path(tmp_path, keras3_file, legacy_file, layout, kept):
    source = keras3_file if layout == 'keras3' else legacy_file
    path = _copy(source, tmp_path, 'cut.h5')
    with open(path, 'r+b') as f:
        f.truncate(int(os.path.getsize(path) * kept))
    with pytest.raises(ValueError, match=r'cut\.h5.*truncated'):
        weights.load_keras_resnet50(path)


def test_legacy_file_missing_a_layer(tmp_path, legacy_file):
    path = _copy(legacy_file, tmp_path)
    with h5py.File(path, 'r+') as f:
        del f['model_weights/conv3_block2_2_bn']
    with pytest.raises(ValueError, match=r'copy\.h5.*lacks 1 of the 106.*conv3_block2_2_bn'):
        weights.load_keras_resnet50(path)


def test_keras3_file_missing_layers_lists_the_first_few(tmp_path, keras3_file):
    path = _copy(keras3_file, tmp_path)
    gone = ['conv1_conv', 'conv2_block1_0_bn', 'conv4_block5_1_conv', 'conv5_block1_2_bn',
            'conv5_block2_3_conv', 'conv5_block3_1_bn', 'conv5_block3_3_bn']
    with h5py.File(path, 'r+') as f:
        for layer in gone:
            del f['layers'][_keras3_group_of(f, layer)]
    with pytest.raises(ValueError) as error:
        weights.load_keras_resnet50(path)
    message = str(error.value)
    assert 'copy.h5' in message and 'lacks 7 of the 106' in message and '2 more' in message
    assert all(layer in message for layer in gone[:5])


def test_missing_variable_is_named(tmp_path, legacy_file, keras3_file):
    legacy = _copy(legacy_file, tmp_path, 'legacy.h5')
    with h5py.File(legacy, 'r+') as f:
        del f['model_weights/conv1_bn/conv1_bn/moving_variance']
    with pytest.raises(ValueError, match=r'legacy\.h5.*conv1_bn/moving_variance'):
        weights.load_keras_resnet50(legacy)
    new = _copy(keras3_file, tmp_path, 'new.weights.h5')
    with h5py.File(new, 'r+') as f:
        del f['layers'][_keras3_group_of(f, 'conv4_block2_3_bn')]['vars/2']
    with pytest.raises(ValueError, match=r'new\.weights\.h5.*conv4_block2_3_bn/moving_mean'):
        weights.load_keras_resnet50(new)


def test_shape_mismatch_is_named(tmp_path, legacy_file):
    path = _copy(legacy_file, tmp_path)
    with h5py.File(path, 'r+') as f:
        group = f['model_weights/conv2_block1_2_conv/conv2_block1_2_conv']
        del group['kernel']
        group['kernel'] = np.zeros((3, 3, 64, 32), np.float32)
    with pytest.raises(ValueError, match=r'copy\.h5.*conv2_block1_2_conv/kernel is \(3, 3, 64, 32\)'):
        weights.load_keras_resnet50(path)


# --------------------------------------------------------------------------- variables on disk


def _assert_bit_identical(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_save_load_round_trip_is_bit_exact(tmp_path):
    special = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45, 3.4e38], np.float32)
    variables = {'params': {'dense': {'kernel': jax.random.normal(jax.random.key(1), (3, 4)),
                                      'bias': special}},
                 'batch_stats': {'bn': {'count': np.arange(5, dtype=np.int32)}}}
    path = tmp_path / 'sub' / 'vars.msgpack'
    weights.save_variables(variables, path)
    _assert_bit_identical(weights.load_variables(path), variables)
    assert os.listdir(path.parent) == ['vars.msgpack']   # no temporary file left behind


def test_convert_writes_the_converted_variables(tmp_path, keras3_file):
    output = str(tmp_path / 'resnet50.msgpack')
    assert weights.convert(keras3_file, output) == output
    _assert_bit_identical(weights.load_variables(output), weights.load_keras_resnet50(keras3_file))


def test_failed_convert_leaves_no_output(tmp_path, keras3_file):
    output = tmp_path / 'out.msgpack'
    with pytest.raises(FileNotFoundError):
        weights.convert(str(tmp_path / 'absent.h5'), str(output))
    broken = _copy(keras3_file, tmp_path, 'broken.h5')
    os.truncate(broken, os.path.getsize(broken) // 2)
    with pytest.raises(ValueError):
        weights.convert(broken, str(output))
    assert not output.exists()
    # An earlier output survives a failed conversion untouched.
    output.write_bytes(b'previous')
    with pytest.raises(ValueError):
        weights.convert(broken, str(output))
    assert output.read_bytes() == b'previous'


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args):
        raise OSError('disk full')

    monkeypatch.setattr(os, 'replace', fail)
    with pytest.raises(OSError, match='disk full'):
        weights.save_variables({'params': {'w': np.ones(3)}}, tmp_path / 'v.msgpack')
    assert os.listdir(tmp_path) == []


def test_load_variables_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='absent.msgpack'):
        weights.load_variables(tmp_path / 'absent.msgpack')
    path = tmp_path / 'cut.msgpack'
    weights.save_variables({'params': {'w': np.ones((100, 100), np.float32)}}, path)
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match=r'cut\.msgpack'):
        weights.load_variables(path)


def test_convert_imagenet_offline_explains_the_manual_route(tmp_path, monkeypatch):
    calls = []

    def offline_get_file(fname, origin, **kwargs):
        # What keras.utils.get_file raises when the host cannot be resolved.
        calls.append((fname, origin, kwargs))
        raise Exception(f'URL fetch failure on {origin}: None -- '
                        '[Errno -3] Temporary failure in name resolution')

    monkeypatch.setattr(keras.utils, 'get_file', offline_get_file)
    monkeypatch.setenv('KERAS_HOME', str(tmp_path / 'keras_home'))
    output = tmp_path / 'out.msgpack'
    with pytest.raises(RuntimeError) as error:
        weights.convert('imagenet', str(output))
    message = str(error.value)
    assert '--weights=PATH' in message and 'Temporary failure in name resolution' in message
    expected_cache = tmp_path / 'keras_home' / 'models' / weights.KERAS_WEIGHTS_FILE
    assert str(expected_cache) in message and weights.KERAS_WEIGHTS_URL in message
    assert calls == [(weights.KERAS_WEIGHTS_FILE, weights.KERAS_WEIGHTS_URL,
                      {'cache_subdir': 'models', 'file_hash': weights.KERAS_WEIGHTS_MD5})]
    assert not output.exists()
