"""A tiny, fast variant of the default config for tests.

    python launch.py --config=configs/tiny.py --workdir=/tmp/tiny

Trains a few steps on a few dozen 32x32 scenes; the numbers mean nothing, only
that every stage of the job runs and its contracts hold.
"""

import ml_collections

from configs import shapes


def get_config() -> ml_collections.ConfigDict:
    config = shapes.get_config()
    config.data.image_size = 32
    config.data.num_train = 48
    config.data.num_val = 10
    config.data.num_test = 6
    config.data.max_len = 16
    config.data.num_threads = 1
    config.data.prefetch = 2
    config.model.encoder.stage_sizes = (1, 1)
    config.model.encoder.num_filters = 4
    config.model.embed_dim = 16
    config.model.units = 32
    config.model.attention_units = 16
    config.model.max_decode_len = 12
    config.optim.warmup_steps = 2
    config.train.batch_size = 8
    config.train.num_steps = 6
    config.train.log_every_steps = 2
    config.eval.batch_size = 4
    config.eval.num_heatmaps = 1
    config.eval.beam_sizes = (1,)
    config.ckpt.every_steps = 3
    return config
