"""The reference recipe on MS-COCO 2014: frozen ImageNet ResNet-50, cached grids, attention LSTM.

What the reference (a TF/Keras course project) did on MS-COCO 2014 train: 224x224
images through a frozen Keras ResNet-50 (7x7x2048 grids, caffe preprocessing), a
5,000-word vocabulary, captions padded to 35 tokens, Dense(256)+ReLU regions,
Bahdanau attention (512), Embedding(256), LSTM(512) -> LSTM(512), plain Adam 1e-3,
batch 64, 10 epochs, a fixed-seed 50% sample of the training images.

Commands, from the repository root (W = runs/coco):
    python -m jaxcap.data.coco                 # once: TFDS coco_captions/2014 as array_record
                                               # (~40 GB download; see jaxcap/data/coco.py)
    python launch.py --mode=convert --weights=imagenet \\
        --output=$HOME/jaxcap_weights/resnet50_imagenet.msgpack   # once: Keras ImageNet -> Flax
    python launch.py --mode=extract --config=configs/coco.py --workdir=W
                                               # once: 7x7x2048 float16 grids into data.features_dir
                                               # (200,704 bytes per image: ~11 GB for the 56,643
                                               # training images, ~1 GB per 5,000-image eval split)
    python launch.py --config=configs/coco.py --workdir=W          # train, then evaluate val
    python launch.py --mode=eval --workdir=W --split=test          # the Karpathy test split

Training data: train+restval = 82,783 + 30,504 = 113,287 images; train_fraction 0.5
keeps floor(0.5 x 113,287) = 56,643 of them (seeded by data.build_seed). (The
reference sampled 50% of train alone, 41,391 images; restval is the standard
addition on the Karpathy splits.) The reference counted an epoch over (image,
caption) pairs, ~5 per image, so its 10 epochs are 10 x 56,643 x 5 / 64 = 44,252
steps of batch 64 here. The pipeline draws one random caption per image per pass
instead, so that is 50 passes over the images, and every caption is still seen ~10
times. Scale train.num_steps with train_fraction or batch_size if you change them.

Speed, measured on one H100 (jax 0.11.2) with a minimal Adam step of this model (not
the full loop: no input pipeline, logging, checkpoints or validation): 8.1 ms per
step of 64 cached grids, so the 44,252 steps take ~6 min of accelerator time; the
run then reads 64 x 200 KB of grids per step from data.features_dir, so keep the
cache on a fast local disk (it fits in the page cache of a 128 GB machine).

Expected result: we have NOT run this recipe on full COCO here (only its pipeline,
on a tiny mock of the data set in tests/test_coco.py), so there is no measured
number yet. The published anchor for this architecture is Show, Attend and Tell's
soft attention on COCO (Xu et al. 2015): Bleu_4 24.3, METEOR 23.9 (x100; our tables
print fractions: 0.243, 0.239). That model differs (VGG grids, dropout, the doubly
stochastic attention penalty, early stopping on BLEU); this recipe keeps the
reference's simpler choices. We expect val scores in that neighbourhood, with
nothing measured to back it yet. configs/coco_finetune.py also trains the top of
the encoder.
"""

import ml_collections

from configs import shapes

# Karpathy & Li (2015) split sizes (images) and COCO's captions per image (616,767 / 123,287).
TRAIN_IMAGES = 82_783
RESTVAL_IMAGES = 30_504
CAPTIONS_PER_IMAGE = 5
EPOCHS = 10   # the reference's, over (image, caption) pairs


def steps_for(train_images: int, fraction: float, batch_size: int, epochs: int = EPOCHS) -> int:
    """Steps of `batch_size` that make `epochs` passes over the (image, caption) pairs kept."""
    return epochs * int(fraction * train_images) * CAPTIONS_PER_IMAGE // batch_size


def get_config() -> ml_collections.ConfigDict:
    config = shapes.get_config()   # every key, then the recipe's values

    # data: TFDS coco_captions/2014 (Karpathy splits), prepared by `python -m jaxcap.data.coco`.
    config.data.name = 'coco'
    config.data.manual_dir = ''        # pre-downloaded zips ('' = <tfds_dir>/downloads/manual)
    config.data.image_size = 224       # ResNet-50 -> 7x7 grid
    config.data.max_words = 5000
    config.data.max_len = 35           # tokens incl. <start> and <end>
    config.data.num_threads = 8        # JPEG decoding and resizing (when not reading the cache)
    config.data.prefetch = 4
    config.data.train_split = 'train+restval'
    config.data.train_fraction = 0.5   # the reference's 50% sample
    config.data.build_seed = 0         # seeds the train_fraction subset (not training)
    config.data.features_dir = '~/jaxcap_features/coco'  # grids from --mode=extract
    # num_train / num_val / num_test belong to the shapes data set and are unused here.

    # model: Keras ResNet-50 (v1, caffe preprocessing), frozen; the reference's decoder sizes.
    config.model.encoder.stage_sizes = (3, 4, 6, 3)
    config.model.encoder.num_filters = 64
    config.model.encoder.preprocess = 'caffe'
    config.model.encoder.train_stages = 0    # frozen: no gradients, no BatchNorm updates
    config.model.encoder.weights = '~/jaxcap_weights/resnet50_imagenet.msgpack'  # --mode=convert
    config.model.embed_dim = 256
    config.model.units = 512
    config.model.attention_units = 512
    config.model.position_embedding = False  # as the reference
    config.model.max_decode_len = 35

    # optim: plain Adam 1e-3, as the reference: no warmup, no decay, no clipping.
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 0
    config.optim.decay = 'constant'
    config.optim.grad_clip_norm = 0.0
    config.optim.attention_reg = 0.0
    config.optim.encoder_lr_scale = 1.0      # unused while the encoder is frozen

    # train: 10 reference epochs (see the docstring for the arithmetic).
    config.train.batch_size = 64
    config.train.num_steps = steps_for(TRAIN_IMAGES + RESTVAL_IMAGES,
                                       config.data.train_fraction, config.train.batch_size)
    config.train.log_every_steps = 200
    config.train.validate_every_steps = 4425  # ~once per reference epoch
    config.train.validate_examples = 1000

    # eval: the Karpathy val split (5,000 images), greedy and beam 3.
    config.eval.split = 'val'
    config.eval.batch_size = 100
    config.eval.num_examples = 0
    config.eval.num_heatmaps = 8
    config.eval.beam_sizes = (1, 3)

    # ckpt: orbax checkpoints in workdir/checkpoints; the best by validation CIDEr is kept too.
    config.ckpt.every_steps = 2000
    config.ckpt.max_to_keep = 2
    config.ckpt.keep_best = True
    return config
