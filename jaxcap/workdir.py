"""The workdir contract: config.json, vocab.json, run_info.json, checkpoints/, eval/."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata

import jax
import ml_collections

from jaxcap.data import text

CONFIG_FILE, VOCAB_FILE, RUN_INFO_FILE = 'config.json', 'vocab.json', 'run_info.json'
# Sections whose change makes a saved workdir a different experiment.
_FROZEN_SECTIONS = ('model', 'data')
# Fields that may differ on resume: they change speed or bookkeeping, not the results.
_FREE_FIELDS = ('data.num_threads', 'data.prefetch', 'data.tfds_dir', 'model.beam_size',
                'model.length_penalty', 'model.length_penalty_alpha', 'model.block_repeated_trigrams')
_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'tensorflow-datasets',
             'numpy', 'pycocoevalcap')


def write_json(path: str, obj) -> None:
    """Writes atomically, so a crash never leaves a half-written file behind."""
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename: readers see the old or the new file
    os.replace(tmp, path)


def _flatten(tree: dict, prefix: str = '') -> dict:
    out = {}
    for k, v in tree.items():
        key = f'{prefix}{k}'
        out.update(_flatten(v, key + '.') if isinstance(v, dict) else {key: v})
    return out


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    """JSON-ready dict (tuples become lists, as they will when read back)."""
    return json.loads(config.to_json())


def check_compatible(saved: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses to resume a workdir with a different model or data set, naming the fields."""
    new = _flatten(config_to_dict(config))
    old = _flatten(saved)
    diffs = [f'{k}: saved {old.get(k)!r}, now {new.get(k)!r}'
             for k in sorted(set(old) | set(new))
             if k.split('.')[0] in _FROZEN_SECTIONS and k not in _FREE_FIELDS and old.get(k) != new.get(k)]
    if diffs:
        raise ValueError(
            f'{workdir} holds a run with a different model or data config; resuming it would mix two '
            'experiments. Differences:\n  ' + '\n  '.join(diffs) +
            '\nUse a new --workdir, or drop these overrides.')


def prepare_training(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Creates the workdir, or checks a saved one matches, then writes config and run info."""
    from jaxcap import checkpoint  # orbax: only where training starts
    checkpoint.check_directory(workdir)  # a clear error for a file or an unwritable path
    os.makedirs(workdir, exist_ok=True)
    config_path = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(config_path):
        with open(config_path) as f:
            check_compatible(json.load(f), config, workdir)
    # One writer: the processes of a multi-host job share the workdir, and two writing
    # the same file would race on its `.tmp` (the second rename finds it gone).
    if jax.process_index() == 0:
        write_json(config_path, config_to_dict(config))
        write_json(os.path.join(workdir, RUN_INFO_FILE), run_info(config))


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with; a clear error if there is none."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f'{workdir} has no {CONFIG_FILE}: it is not a trained jaxcap workdir. Train first with '
            f'`python launch.py --workdir={workdir}`, or point --workdir at a trained run.')
    with open(path) as f:
        return ml_collections.ConfigDict(_lists_to_tuples(json.load(f)))


def _lists_to_tuples(tree):
    if isinstance(tree, dict):
        return {k: _lists_to_tuples(v) for k, v in tree.items()}
    return tuple(tree) if isinstance(tree, list) else tree


def load_or_build_vocab(workdir: str, build) -> text.Vocabulary:
    """The workdir's vocabulary, built once by `build()` and saved, so a resume reuses it."""
    path = os.path.join(workdir, VOCAB_FILE)
    if os.path.exists(path):
        return text.Vocabulary.load(path)
    vocab = build()
    if jax.process_index() == 0:  # every process builds the same words; one writes them
        vocab.save(path)
    return vocab


def load_vocab(workdir: str) -> text.Vocabulary:
    path = os.path.join(workdir, VOCAB_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f'{workdir} has no {VOCAB_FILE}; train first with '
                                f'`python launch.py --workdir={workdir}`.')
    return text.Vocabulary.load(path)


def run_info(config: ml_collections.ConfigDict) -> dict:
    """What is needed to reproduce a run: versions, devices, seed, git commit."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        'seed': config.seed,
        'python': platform.python_version(),
        'packages': versions,
        'backend': jax.default_backend(),
        'device_kind': jax.devices()[0].device_kind,
        'device_count': jax.device_count(),
        'process_count': jax.process_count(),
        'git_commit': _git_commit(),
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
