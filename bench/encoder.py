"""ResNet-50 feature extraction (224x224 -> 7x7x2048), jaxcap vs Keras ResNet50 in the same process.

    python bench/encoder.py
    python bench/encoder.py --batch 16 --repeats 4

Both sides take uint8 images, apply the caffe preprocessing and run ResNet-50 in
inference mode inside one compiled function: `jaxcap.inference.grid_encoder`, the
function feature extraction runs (on CPU: XLA rather than YNNPACK runs the
convolutions, on chunks of 8 images in turn), and `keras.applications.ResNet50(weights=None,
include_top=False)` (Keras 3, TensorFlow backend) under `tf.function`. Calls
alternate between the two, so load changes hit both alike. `ratio_vs_baseline` is
our images/s over Keras'. `gflop_per_image_xla_cost_analysis` counts the program
that runs: on CPU its 3x3 convolutions are Winograd's (`jaxcap.models.winograd`),
with 16/36 of the multiplies. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import common

# Keras 3 on TensorFlow, and TensorFlow's log noise off, before either is imported.
os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--repeats', type=int, default=5, help='timed calls per side')
    parser.add_argument('--no-baseline', action='store_true', help='skip Keras (no ratio)')
    return parser.parse_args()


def jax_extractor(size: int):
    """(jitted (variables, uint8 images) -> grids function, a captioner's random ResNet-50 variables)."""
    import jax.numpy as jnp

    from jaxcap import inference
    from jaxcap.models import captioner
    model = captioner.Captioner(vocab_size=4, preprocess='caffe')   # a ResNet-50 encoder
    variables = captioner.init_variables(model, 0, jnp.zeros((1, size, size, 3), jnp.uint8),
                                         jnp.zeros((1, 2), jnp.int32))
    return inference.grid_encoder(model), variables


def keras_extractor():
    import keras
    import tensorflow as tf
    model = keras.applications.ResNet50(weights=None, include_top=False)

    @tf.function
    def extract(images):
        x = keras.applications.resnet50.preprocess_input(tf.cast(images, tf.float32))
        return model(x, training=False)

    return lambda images: extract(images).numpy()  # .numpy(): wait for the result


def main():
    args = parse_args()
    import jax
    import numpy as np

    from jaxcap import inference
    images = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3), np.uint8)
    extract, variables = jax_extractor(args.size)
    jax_images = jax.device_put(images)
    sides = {'jaxcap': lambda: extract(variables, jax_images)}
    if not args.no_baseline:
        import tensorflow as tf
        tf_images, keras_extract = tf.constant(images), keras_extractor()
        sides['keras'] = lambda: keras_extract(tf_images)
    first_call_s, shapes = {}, {}
    for name, fn in sides.items():
        start = time.perf_counter()
        shapes[name] = list(np.shape(common.block(fn())))
        first_call_s[name] = round(time.perf_counter() - start, 2)
    times = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, fn in sides.items():
            times[name] += common.time_calls(fn, 1)
    rate = {name: round(args.batch / statistics.median(t), 2) for name, t in times.items()}
    # One chunk, so no loop: XLA's count is exact here.
    chunk = jax_images[:inference.ENCODER_CHUNK]
    gflop_per_image = common.xla_flop(extract.lower(variables, chunk).compile()) / chunk.shape[0] / 1e9
    result = {
        'bench': 'encoder', 'batch': args.batch, 'image_size': args.size, 'grid_shape': shapes,
        'images_per_s': rate,
        'ms_per_batch_median': {name: common.median_ms(t) for name, t in times.items()},
        'ms_min_max': {name: [common.ms(min(t)), common.ms(max(t))] for name, t in times.items()},
        'timed_calls_each': args.repeats, 'first_call_s (compile+run)': first_call_s,
        'gflop_per_image_xla_cost_analysis': round(gflop_per_image, 2),
        'achieved_gflops_jaxcap': round(gflop_per_image * rate['jaxcap'], 1),
        'matmul2048_gflops_jax': common.matmul_gflops(),
    }
    if 'keras' in rate:
        import keras
        import tensorflow as tf
        result.update({'keras_version': keras.__version__, 'tensorflow': tf.__version__,
                       'ratio_vs_baseline': round(rate['jaxcap'] / rate['keras'], 2)})
    common.emit(result)


if __name__ == '__main__':
    common.reexec_with_huge_pages()
    main()
