"""Converts Keras' ImageNet ResNet-50 weights into Flax variables for `ResNet50`.

`jaxcap.models.resnet.ResNet` names its modules after Keras' ResNet50 layers, so
the conversion is a renaming: Keras layer ``conv2_block1_1_conv`` becomes the
Flax module path ``conv2_block1/1_conv``, and kernels keep their HWIO layout.
Two h5 layouts are read, and told apart automatically:

* the legacy Keras h5 layout of the official
  ``resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5`` (and of Keras 2 /
  ``tf_keras`` ``save_weights('x.h5')``): the root has a ``layer_names``
  attribute, and each layer group a ``weight_names`` attribute listing its
  datasets, e.g. ``conv1_conv/conv1_conv/kernel:0``. A Keras 3
  ``model.save('x.h5')`` file has the same layout under ``model_weights/``,
  with names like ``conv1_conv/kernel`` (no ``:0``);
* the Keras 3 ``.weights.h5`` layout of ``model.save_weights('x.weights.h5')``:
  ``layers/<snake_case class>[_<i>]/vars/<j>``, e.g. ``layers/conv2d_3/vars/0``,
  where the ``vars`` group's ``name`` attribute holds the layer name (Keras
  3.15). Files without that attribute are mapped by Keras' layer order.

Converted variables are stored with `save_variables` as msgpack, written
atomically, and read back with `load_variables`.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any

import h5py
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from jaxcap.models.resnet import ResNet50

KERAS_WEIGHTS_FILE = 'resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5'
KERAS_WEIGHTS_URL = (
    'https://storage.googleapis.com/tensorflow/keras-applications/resnet/' + KERAS_WEIGHTS_FILE)
# MD5 that Keras checks the download (and a cached copy) against.
KERAS_WEIGHTS_MD5 = '4d473c1dd8becc155b73f8504c6f6626'

# For each layer kind: (Keras variable, Flax collection, Flax name), in the
# order Keras stores the variables (which is what index-keyed files rely on).
_VARIABLE_MAP = {
    'conv': (('kernel', 'params', 'kernel'),
             ('bias', 'params', 'bias')),
    'bn': (('gamma', 'params', 'scale'),
           ('beta', 'params', 'bias'),
           ('moving_mean', 'batch_stats', 'mean'),
           ('moving_variance', 'batch_stats', 'var')),
}
# Keras 3 names a layer's group after its class when it has no `name` attribute.
_KERAS3_CLASS_KINDS = {'conv2d': 'conv', 'batch_normalization': 'bn'}
_KERAS3_CLASS_KEY = re.compile(r'^(conv2d|batch_normalization)(?:_(\d+))?$')
_MAX_LISTED = 5   # how many missing or wrong names an error message spells out

# Layer name -> {Keras variable name or index -> array}, as read from a file.
_RawLayers = dict[str, dict[str | int, np.ndarray]]


# ----------------------------------------------------------------- model layout


def _layer_kind(layer: str) -> str:
    return 'conv' if layer.endswith('_conv') else 'bn'


@functools.cache
def _expected_layers() -> dict[str, dict[str, tuple[tuple[str, ...], jax.ShapeDtypeStruct]]]:
    """Maps each Keras layer name to {Keras variable: (Flax path, shape and dtype)}.

    Derived from the Flax model itself (shapes only, no compute), so the
    conversion cannot drift from `ResNet50`.
    """
    shapes = jax.eval_shape(ResNet50().init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    # Per kind, because Flax's `bias` is Keras' `bias` in a conv but `beta` in a BatchNorm.
    keras_names = {kind: {(collection, flax_name): keras_name
                          for keras_name, collection, flax_name in variables}
                   for kind, variables in _VARIABLE_MAP.items()}
    layers: dict[str, dict[str, tuple[tuple[str, ...], jax.ShapeDtypeStruct]]] = {}
    for path, spec in traverse_util.flatten_dict(shapes).items():
        collection, *module_path, flax_name = path
        layer = '_'.join(module_path)
        keras_name = keras_names[_layer_kind(layer)][(collection, flax_name)]
        layers.setdefault(layer, {})[keras_name] = (path, spec)
    # Sorted by name, so error messages list layers in a predictable order.
    return dict(sorted(layers.items()))


def _keras_layer_order(kind: str) -> list[str]:
    """ResNet50's conv or BatchNorm layer names in the order Keras builds them.

    Keras creates a stage's first block as 1, 2, projection (0), 3; Keras 3
    numbers its class-named groups (``conv2d_3``) in that order.
    """
    suffix = '_conv' if kind == 'conv' else '_bn'
    names = ['conv1' + suffix]
    for stage, num_blocks in enumerate(ResNet50.keywords['stage_sizes'], start=2):
        for block in range(1, num_blocks + 1):
            parts = ('1', '2', '0', '3') if block == 1 else ('1', '2', '3')
            names += [f'conv{stage}_block{block}_{part}{suffix}' for part in parts]
    return names


# ----------------------------------------------------------------- h5 reading


def _decode(value: Any) -> str:
    return value.decode('utf8') if isinstance(value, bytes) else str(value)


def _attr_list(group: h5py.Group, name: str) -> list[str] | None:
    """Reads a list attribute, which Keras splits into name0, name1, ... when large."""
    if name in group.attrs:
        return [_decode(v) for v in np.atleast_1d(group.attrs[name])]
    if f'{name}0' not in group.attrs:
        return None
    values, chunk = [], 0
    while f'{name}{chunk}' in group.attrs:
        values += [_decode(v) for v in np.atleast_1d(group.attrs[f'{name}{chunk}'])]
        chunk += 1
    return values


def _legacy_root(f: h5py.File) -> h5py.Group | None:
    """The group holding legacy per-layer weights, or None if the layout is not legacy."""
    for group in (f, f.get('model_weights')):
        if isinstance(group, h5py.Group) and _attr_list(group, 'layer_names') is not None:
            return group
    return None


def _read_legacy(root: h5py.Group) -> _RawLayers:
    """Reads `root/<layer>/<weight name>` datasets, keyed by their short names (`kernel`)."""
    layers: _RawLayers = {}
    for layer in _attr_list(root, 'layer_names'):
        group = root.get(layer)
        if not isinstance(group, h5py.Group):
            continue   # reported as missing once we know which layers we need
        weight_names = _attr_list(group, 'weight_names') or []
        variables = {}
        for weight_name in weight_names:
            dataset = group.get(weight_name)
            if not isinstance(dataset, h5py.Dataset):
                continue   # reported as a missing variable, by name, later
            # 'conv1_conv/kernel:0' (Keras 2) or 'conv1_conv/kernel' (Keras 3) -> 'kernel'.
            short = weight_name.rsplit('/', 1)[-1].split(':', 1)[0]
            variables[short] = np.asarray(dataset[()])
        if variables:
            layers[layer] = variables
    return layers


def _keras3_layer_name(key: str, vars_group: h5py.Group) -> str | None:
    """The Keras layer a Keras 3 `layers/<key>/vars` group holds, or None if unused."""
    if 'name' in vars_group.attrs:
        return _decode(vars_group.attrs['name'])
    if key in _expected_layers():
        return key
    # Older Keras 3 files name groups after the class only: count in build order.
    match = _KERAS3_CLASS_KEY.match(key)
    if match is None:
        return None
    order = _keras_layer_order(_KERAS3_CLASS_KINDS[match.group(1)])
    index = int(match.group(2) or 0)
    return order[index] if index < len(order) else None


def _read_keras3(layers_group: h5py.Group) -> _RawLayers:
    """Reads `layers/<key>/vars/<j>` datasets, keyed by their index j."""
    layers: _RawLayers = {}
    for key, group in layers_group.items():
        vars_group = group.get('vars') if isinstance(group, h5py.Group) else None
        if not isinstance(vars_group, h5py.Group) or len(vars_group) == 0:
            continue   # padding, activation, pooling, ... layers hold no variables
        layer = _keras3_layer_name(key, vars_group)
        if layer is None:
            continue
        layers[layer] = {int(j): np.asarray(vars_group[j][()])
                         for j in vars_group if j.isdigit()}
    return layers


def _read_h5(path: str) -> _RawLayers:
    with h5py.File(path, 'r') as f:
        legacy_root = _legacy_root(f)
        if legacy_root is not None:
            return _read_legacy(legacy_root)
        if isinstance(f.get('layers'), h5py.Group):
            return _read_keras3(f['layers'])
    raise ValueError(
        f'{path!r} is an HDF5 file but not Keras weights: it has neither a '
        "'layer_names' attribute (legacy Keras h5) nor a 'layers' group "
        '(Keras 3 .weights.h5).')


def _check_readable(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f'Keras weights file {path!r} does not exist.')
    if os.path.isdir(path):
        raise ValueError(f'Keras weights path {path!r} is a directory, not an .h5 file.')
    if os.path.getsize(path) == 0:
        raise ValueError(f'Keras weights file {path!r} is empty (an interrupted download?).')
    if not h5py.is_hdf5(path):
        raise ValueError(
            f'{path!r} is not an HDF5 file (no HDF5 signature); expected Keras .h5 weights, '
            f'e.g. {KERAS_WEIGHTS_FILE}.')


# ----------------------------------------------------------------- conversion


def _name_variables(layer: str, raw: Mapping[str | int, np.ndarray]) -> dict[str, np.ndarray]:
    """Keys one layer's arrays by Keras variable name, whichever way the file keyed them."""
    names = [name for name, _, _ in _VARIABLE_MAP[_layer_kind(layer)]]
    if all(isinstance(key, str) and key in names for key in raw):
        return dict(raw)
    if all(isinstance(key, int) for key in raw):
        return {names[key]: value for key, value in raw.items() if key < len(names)}
    # Unfamiliar weight names (e.g. very old Keras' 'W_1:0'): Keras' own loader
    # goes by position, so do the same.
    return dict(zip(names, raw.values()))


def _listed(items: list[str]) -> str:
    shown = ', '.join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f' (and {more} more)' if more > 0 else '')


def _to_flax(path: str, raw_layers: _RawLayers) -> dict[str, Any]:
    """Builds the Flax variables, or raises ValueError listing what is missing or wrong."""
    expected = _expected_layers()
    missing_layers = [layer for layer in expected if layer not in raw_layers]
    if missing_layers:
        raise ValueError(
            f'{path!r} lacks {len(missing_layers)} of the {len(expected)} ResNet-50 layers: '
            f'{_listed(missing_layers)}. Is it a complete Keras ResNet50 weights file?')
    flat, missing, wrong = {}, [], []
    for layer, variables in expected.items():
        found = _name_variables(layer, raw_layers[layer])
        for keras_name, (flax_path, spec) in variables.items():
            if keras_name not in found:
                missing.append(f'{layer}/{keras_name}')
                continue
            value = found[keras_name]
            if value.shape != spec.shape:
                wrong.append(f'{layer}/{keras_name} is {value.shape}, expected {spec.shape}')
                continue
            flat[flax_path] = value.astype(spec.dtype, copy=False)
    if missing:
        raise ValueError(f'{path!r} lacks {len(missing)} variable(s): {_listed(missing)}.')
    if wrong:
        raise ValueError(
            f'{path!r} does not fit ResNet50, {len(wrong)} shape mismatch(es): {_listed(wrong)}.')
    return traverse_util.unflatten_dict(flat)


def load_keras_resnet50(path: str | os.PathLike) -> dict[str, Any]:
    """Reads Keras ResNet50 weights (legacy .h5 or Keras 3 .weights.h5) as Flax variables.

    Layers the model does not use (e.g. a classifier head) are ignored.

    Args:
        path: The h5 file, e.g. Keras' ``resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5``.

    Returns:
        ``{'params': ..., 'batch_stats': ...}`` of float32 numpy arrays for
        ``ResNet50()``, every leaf present and of the model's shape.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not HDF5, is truncated or unreadable, is not
            in a Keras layout, or lacks a layer or variable, or has a
            wrongly-shaped one; the message names the file and the culprits.
    """
    path = os.fspath(path)
    _check_readable(path)
    try:
        raw_layers = _read_h5(path)
    except (OSError, KeyError, RuntimeError) as err:
        # h5py reports truncation and corruption as OSError (or KeyError for a broken link).
        raise ValueError(
            f'Cannot read Keras weights from {path!r} ({type(err).__name__}: {err}); '
            'the file may be truncated or corrupt: download or save it again.') from err
    return _to_flax(path, raw_layers)


# ----------------------------------------------------------------- variables on disk


def _current_umask() -> int:
    # os.umask can only be read by setting it; restore it straight away.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: str, data: bytes) -> None:
    """Writes `data` to a temporary file beside `path`, then renames it into place.

    The rename is atomic, so readers see either the old file or the complete
    new one, never a partial write, even if this process dies mid-way.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.',
                                    suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; give it the mode a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_current_umask())
        os.replace(tmp_path, path)
    except BaseException:
        try:
            os.unlink(tmp_path)
        except FileNotFoundError:
            pass
        raise


def save_variables(variables: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes Flax variables to ``path`` as msgpack, atomically.

    Args:
        variables: A nested mapping of arrays (e.g. ``{'params': ..., 'batch_stats': ...}``).
        path: Output file; its directory is created if needed, and an existing
            file is replaced only once the new one is completely written.
    """
    state = serialization.to_state_dict(variables)
    host_state = jax.tree_util.tree_map(np.asarray, state)
    _atomic_write(os.fspath(path), serialization.msgpack_serialize(host_state))


def load_variables(path: str | os.PathLike) -> dict[str, Any]:
    """Reads variables written by `save_variables`.

    Args:
        path: The msgpack file.

    Returns:
        The nested dict of numpy arrays, bit-identical to what was saved.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not a msgpack variables file (e.g. truncated).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f'Variables file {path!r} does not exist.')
    with open(path, 'rb') as f:
        data = f.read()
    try:
        variables = serialization.msgpack_restore(data)
    except Exception as err:  # noqa: BLE001 - msgpack raises several types on bad data.
        raise ValueError(
            f'Cannot read variables from {path!r} ({type(err).__name__}: {err}); '
            'it may be truncated or not written by save_variables.') from err
    if not isinstance(variables, dict):
        raise ValueError(f'{path!r} holds a {type(variables).__name__}, not a variables dict.')
    return variables


# ----------------------------------------------------------------- conversion entry point


def _keras_cache_path() -> str:
    """Where `keras.utils.get_file` looks for (and caches) the ImageNet weights."""
    keras_home = os.environ.get('KERAS_HOME') or os.path.join(os.path.expanduser('~'), '.keras')
    return os.path.join(keras_home, 'models', KERAS_WEIGHTS_FILE)


def _download_imagenet_weights() -> str:
    """Returns the path of Keras' ImageNet ResNet50 file, downloading it if not cached.

    Raises:
        RuntimeError: If Keras is missing or the download fails (e.g. offline),
            saying where to put the file by hand or to pass ``--weights=PATH``.
    """
    manual = (f'Download {KERAS_WEIGHTS_URL} on a machine with internet access and either put '
              f'it at {_keras_cache_path()} (Keras\' cache; a copy there whose MD5 is not '
              f'{KERAS_WEIGHTS_MD5} counts as incomplete) or pass --weights=PATH to use it '
              'directly.')
    try:
        # Imported here only: Keras (and TensorFlow) are needed for nothing but this download.
        import keras
    except ImportError as err:
        raise RuntimeError(f'Downloading ImageNet weights needs Keras, which is not '
                           f'installed. {manual}') from err
    try:
        return keras.utils.get_file(KERAS_WEIGHTS_FILE, KERAS_WEIGHTS_URL,
                                    cache_subdir='models', file_hash=KERAS_WEIGHTS_MD5)
    except Exception as err:  # noqa: BLE001 - get_file raises a bare Exception when offline.
        raise RuntimeError(
            f'Could not download the ImageNet ResNet-50 weights ({type(err).__name__}: {err}). '
            f'{manual}') from err


def convert(weights: str, output: str) -> str:
    """Converts Keras ResNet50 weights into a Flax variables file.

    Args:
        weights: Path of a Keras h5 weights file, or ``'imagenet'`` to use
            Keras' ImageNet weights (downloaded into Keras' cache if absent).
        output: Where to write the Flax variables (see `save_variables`);
            nothing is written unless the conversion succeeds.

    Returns:
        ``output``.

    Raises:
        RuntimeError: If ``'imagenet'`` weights cannot be downloaded.
        FileNotFoundError, ValueError: As for `load_keras_resnet50`.
    """
    path = _download_imagenet_weights() if weights == 'imagenet' else weights
    save_variables(load_keras_resnet50(path), output)
    return output
