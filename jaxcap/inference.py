"""Using a trained workdir: `--mode=eval` and `--mode=caption` on the user's own images."""

from __future__ import annotations

import functools
import glob
import json
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcap import checkpoint, decode, evaluate, parallel, train, workdir as workdir_lib, xla_options
from jaxcap.data import features, pipeline, text
from jaxcap.data import images as image_ops
from jaxcap.models import captioner


def restore(workdir: str, beam_size: int | None = None):
    """(config, vocab, model, variables) of a trained workdir's latest checkpoint.

    `beam_size`, if given, replaces the config's decoding beam width.
    """
    config = workdir_lib.load_config(workdir)
    if beam_size is not None:
        config.model.beam_size = beam_size
    vocab = workdir_lib.load_vocab(workdir)
    model = captioner.from_config(config.model, len(vocab))
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                           config.ckpt.every_steps, config.ckpt.max_to_keep)
    if checkpointer.latest_step() is None:
        raise FileNotFoundError(f'{workdir} has no checkpoint yet; train first with '
                                f'`python launch.py --workdir={workdir}`.')
    # The checkpoint holds every parameter: no need for the encoder's init weights file.
    init_config = config.copy_and_resolve_references()
    init_config.model.encoder.weights = ''
    state = train.initial_state(init_config, model, parallel.make_mesh())
    state = checkpointer.restore(state)
    checkpointer.close()
    return config, vocab, model, state.variables()


def evaluate_workdir(workdir: str, split: str | None = None,
                     beam_size: int | None = None) -> dict[str, dict[str, float]]:
    config, vocab, model, variables = restore(workdir, beam_size)
    beam_sizes = None if beam_size is None else (beam_size,)
    return evaluate.evaluate_split(config, model, vocab, variables, workdir, split=split,
                                   beam_sizes=beam_sizes)


def expand_paths(patterns: Sequence[str]) -> list[str]:
    """Comma-separated paths or globs -> paths; a pattern matching nothing is kept as given
    (so it is reported as missing rather than silently dropped)."""
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern))) if glob.has_magic(pattern) else []
        paths.extend(matches or [pattern])
    return paths


def caption_images(workdir: str, patterns: Sequence[str], heatmaps_dir: str | None = None,
                   out=sys.stdout, beam_size: int | None = None) -> list[dict]:
    """Prints one JSON line per image: {"image", "caption", "score"} or {"image", "error"}.

    A file that cannot be read as an image gets an error line; the others are
    still captioned.
    """
    config, vocab, model, variables = restore(workdir, beam_size)
    evaluator = evaluate.Evaluator(model, vocab, config)
    variables = decode.prepare(model, variables)   # once, not per chunk of images
    paths = expand_paths(patterns)
    lines: list[dict] = [{'image': p} for p in paths]
    loaded = []  # (index into paths, resized image)
    for i, path in enumerate(paths):
        try:
            loaded.append((i, image_ops.load_image(path, config.data.image_size)))
        except image_ops.ImageLoadError as e:
            lines[i]['error'] = str(e)
    batch_size = config.eval.batch_size
    for start in range(0, len(loaded), batch_size):
        chunk = loaded[start:start + batch_size]
        batch = _padded_batch([image for _, image in chunk], batch_size)
        for (i, _), result in zip(chunk, evaluator.caption_batches(variables, [batch])):
            lines[i].update(caption=result['caption'], score=result['score'])
            if heatmaps_dir:
                name = f'{i:04d}_{os.path.splitext(os.path.basename(paths[i]))[0]}.png'
                lines[i]['heatmap'] = evaluator.save_heatmap(result, os.path.join(heatmaps_dir, name))
    for line in lines:
        print(json.dumps(line), file=out, flush=True)
    return lines


def _padded_batch(images: list[np.ndarray], batch_size: int) -> dict:
    pad = batch_size - len(images)
    return {'images': np.stack(images + [images[-1]] * pad),
            'valid': np.array([True] * len(images) + [False] * pad),
            'image_ids': list(range(len(images)))}


# Images a feature-extraction call runs through the encoder at once, on CPU.
ENCODER_CHUNK = 8


def grid_encoder(model: captioner.Captioner, chunk: int = ENCODER_CHUNK):
    """The jitted (variables, uint8 images) -> grids function that feature caches are made with.

    Compiled with `xla_options.jit`: on CPU, XLA's own kernels run the ResNet's
    convolutions, faster than YNNPACK's. The variables are an argument, not
    closed over: closed over, they would be baked into the executable as
    constants (ResNet-50's 100 MB). On CPU, a batch runs through the encoder
    `chunk` images at a time (`in_chunks`).
    """
    def encode(variables, images):
        encode_grid = functools.partial(model.apply, variables, method=captioner.Captioner.encode_grid)
        return in_chunks(encode_grid, images, chunk)

    return xla_options.jit(encode)


def in_chunks(fn, images, chunk: int):
    """fn(images), from fn run on chunks of at most `chunk` images in turn (`lax.map`), on CPU.

    For a per-image fn (an encoder in inference mode) the result is the same,
    bitwise. A chunk's activations stay in the CPU's caches where a whole
    batch's do not (ResNet-50's first stage holds 3.2 MB per image in each
    of several tensors): feature extraction at batch 32 ran 1.04-1.07x as fast
    in chunks of 8, 1.3x beside other compiled functions in one process
    (BENCHMARKS.md, round 10). GPUs and TPUs take the batch whole.
    """
    batch = images.shape[0]
    if batch <= chunk or jax.default_backend() != 'cpu':
        return fn(images)
    count = -(-batch // chunk)
    size = -(-batch // count)   # as even as possible: fewer than `count` padding images
    padding = jnp.zeros((count * size - batch,) + images.shape[1:], images.dtype)
    padded = jnp.concatenate([images, padding])
    out = jax.lax.map(fn, padded.reshape((count, size) + images.shape[1:]))
    return out.reshape((count * size,) + out.shape[2:])[:batch]


def extract_features(config, split: str | None = None) -> list[str]:
    """Caches the frozen encoder's grids of `split` (default: the train and eval splits).

    The encoder is the one training would start from (converted weights, or the
    seed's random ones), so training on the cache equals training with that
    frozen encoder on images. Returns the cache directories.
    """
    train.check_encoder_mode(config, needs_cache=True)
    # The encoder's parameters do not depend on the vocabulary (Flax derives each
    # module's random key from its name), so the special tokens stand in for it.
    model = captioner.from_config(config.model, len(text.SPECIAL_TOKENS))
    state = train.initial_state(config, model, parallel.make_mesh(jax.local_devices()[:1]))
    encode = functools.partial(grid_encoder(model), state.variables())
    fingerprint = features.fingerprint_encoder(config)
    splits = [config.data.train_split, config.eval.split] if split is None else [split]
    # The training split is cached as training reads it: the data.train_fraction subset.
    jobs = [(name, pipeline.load_train_source(config.data) if name == config.data.train_split
             else pipeline.load_source(config.data, name)) for name in splits]
    return [features.extract_split(config, name, encode, fingerprint, source=records)
            for name, records in jobs]
