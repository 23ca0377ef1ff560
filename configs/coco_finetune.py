"""configs/coco.py with the top two ResNet-50 stages fine-tuned, on images decoded on the fly.

Commands, from the repository root (W = runs/coco_finetune), after the data set and
the converted weights of configs/coco.py exist (no feature cache: the encoder changes):
    python launch.py --config=configs/coco_finetune.py --workdir=W    # train, then evaluate val
    python launch.py --mode=eval --workdir=W --split=test

The top two of ResNet-50's four stages (conv4_x and conv5_x: the most task-specific
layers, 22.1M of its 23.5M parameters) learn at 0.1x the decoder's rate (1e-4), so
the ImageNet features are adjusted rather than overwritten; the stem (conv1),
conv2_x and conv3_x stay frozen, BatchNorm statistics included. Each step now runs ResNet-50 forward on 64 images and backward
through two stages, and the input pipeline decodes and resizes 64 JPEGs per step.
Measured on one H100 machine (jax 0.11.2, a minimal Adam step, not the full loop):
the step itself took ~23 ms (configs/coco.py's, from cached grids: 8 ms), but
decoding and resizing a 640x480 JPEG ran at ~650 images/s with 8 threads on its 16
CPU cores (no faster with 16), i.e. ~100 ms per batch: the input pipeline sets the
pace, so expect ~75 min or more for the 44,252 steps. The batch stays the
reference's 64.

Expected result: not run on full COCO here either, so nothing measured; the anchor
is configs/coco.py's (Show, Attend and Tell soft attention: Bleu_4 24.3, METEOR 23.9).
"""

import ml_collections

from configs import coco


def get_config() -> ml_collections.ConfigDict:
    config = coco.get_config()

    # data: images on the fly (a cache of a changing encoder would go stale).
    config.data.features_dir = ''

    # model: the top two of ResNet-50's four stages learn.
    config.model.encoder.train_stages = 2

    # optim: the encoder at a tenth of the decoder's learning rate.
    config.optim.encoder_lr_scale = 0.1
    return config
