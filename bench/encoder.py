"""ResNet-50 feature extraction (224x224 -> 7x7x2048), jaxcap vs Keras ResNet50 in the same process.

    python bench/encoder.py
    python bench/encoder.py --batch 16 --repeats 4

Both sides take uint8 images, apply the caffe preprocessing and run ResNet-50 in
inference mode inside one compiled function: `jaxcap.models.resnet.ResNet50`
under `jaxcap.xla_options.jit` (as feature extraction runs it: on CPU, XLA
rather than YNNPACK runs the convolutions), and `keras.applications.ResNet50(weights=None,
include_top=False)` (Keras 3, TensorFlow backend) under `tf.function`. Calls
alternate between the two, so load changes hit both alike. `ratio_vs_baseline` is
our images/s over Keras'. Prints one JSON line.
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
    """(jitted uint8 images -> grid function, its random ResNet-50 variables)."""
    import jax.numpy as jnp

    from jaxcap import xla_options
    from jaxcap.data import images as image_ops
    from jaxcap.models import captioner, resnet
    model = resnet.ResNet50()
    variables = captioner.init_variables(model, 0, jnp.zeros((1, size, size, 3), jnp.float32))

    # Compiled as feature extraction compiles the encoder (`jaxcap.inference.grid_encoder`).
    @xla_options.jit
    def extract(variables, images):
        return model.apply(variables, image_ops.preprocess(images, 'caffe'), train=False)

    return extract, variables


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
    # No loops in a ResNet: XLA's count is exact here.
    gflop_per_image = common.xla_flop(extract.lower(variables, jax_images).compile()) / args.batch / 1e9
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
