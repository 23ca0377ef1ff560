"""jaxcap entry point.

    python launch.py [--config=configs/shapes.py] [--workdir=runs/shapes] [--config.a.b=value ...]
                     [--mode=train|eval|caption|extract|convert] [--images=a.png,dir/*.jpg]
                     [--heatmaps_dir=DIR] [--beam_size=K] [--weights=PATH|imagenet --output=PATH]

`train` resumes from --workdir when it holds checkpoints, then evaluates; `eval` and
`caption` use the workdir's saved config, vocabulary and latest checkpoint; `extract`
caches the frozen encoder's grids of the train and eval splits in
config.data.features_dir; `convert` turns Keras ResNet-50 weights into Flax variables.

Several hosts: run the same command on each with
--config.parallel.coordinator_address=HOST:PORT (and num_processes/process_id, unless
the cluster's environment provides them).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_REPO = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(_REPO, 'configs', 'shapes.py'), 'Experiment config file; override fields with --config.a.b=v.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/shapes', 'Where checkpoints, logs and results go.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'caption', 'extract', 'convert'],
                          'What to do.')
_IMAGES = flags.DEFINE_list('images', [], 'caption mode: image paths or globs, comma-separated.')
_HEATMAPS_DIR = flags.DEFINE_string('heatmaps_dir', None, 'caption mode: where to save heatmaps.')
_SPLIT = flags.DEFINE_string('split', None, 'eval/extract: the split (default config.eval.split; '
                             'extract: the train and eval splits).')
_BEAM_SIZE = flags.DEFINE_integer('beam_size', None, 'eval/caption: beam width (default: the config).')
_WEIGHTS = flags.DEFINE_string('weights', None, "convert: a Keras ResNet-50 .h5 file, or 'imagenet'.")
_OUTPUT = flags.DEFINE_string('output', None, 'convert: where to write the Flax variables.')
_TRACEBACK = flags.DEFINE_bool('traceback', False, 'Show the full traceback of a failure.')

# Failures that mean "fix the input": shown as one line, not a traceback.
_USER_ERRORS = (FileNotFoundError, NotADirectoryError, PermissionError, ValueError,
                FloatingPointError, NotImplementedError, RuntimeError)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if not flags.FLAGS['verbosity'].present:
        # Orbax and TFDS log every file they touch at INFO; the job's own progress
        # goes to the progress bar and the printed lines.
        logging.set_verbosity(logging.WARNING)
    try:
        start_jax(_CONFIG.value.parallel)
        run()
    except _USER_ERRORS as e:
        if _TRACEBACK.value:
            raise
        sys.exit(f'jaxcap: error: {e}\n(run with --traceback for the full traceback)')


def start_jax(parallel_config):
    """XLA flags and the multi-host handshake: both before JAX starts its backends."""
    from jaxcap import parallel

    if parallel_config.deterministic_gpu:
        parallel.set_deterministic_gpu_flags()
    parallel.initialize_distributed(parallel_config)
    import jax
    logging.info('JAX process %d/%d, devices: %s', jax.process_index(), jax.process_count(),
                 jax.devices())


def run():
    """Dispatches on --mode."""
    from jaxcap import inference, train

    if _MODE.value == 'train':
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    elif _MODE.value == 'eval':
        inference.evaluate_workdir(_WORKDIR.value, _SPLIT.value, _BEAM_SIZE.value)
    elif _MODE.value == 'caption':
        if not _IMAGES.value:
            raise app.UsageError('--mode=caption needs --images=PATH[,PATH...] (globs allowed).')
        inference.caption_images(_WORKDIR.value, _IMAGES.value, _HEATMAPS_DIR.value,
                                 beam_size=_BEAM_SIZE.value)
    elif _MODE.value == 'extract':
        for path in inference.extract_features(_CONFIG.value, _SPLIT.value):
            print(path)
    else:
        if not (_WEIGHTS.value and _OUTPUT.value):
            raise app.UsageError('--mode=convert needs --weights=PATH|imagenet and --output=PATH.')
        from jaxcap import weights
        print(weights.convert(_WEIGHTS.value, _OUTPUT.value))


if __name__ == '__main__':
    from jaxcap import hostmem
    hostmem.reexec_with_huge_pages()  # first: it restarts the process (see jaxcap/hostmem.py)
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    sys.path.insert(0, _REPO)  # `configs` importable from any working directory
    app.run(main)
