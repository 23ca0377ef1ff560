"""The default job: train and evaluate on synthetic shape scenes, offline, on one CPU.

Command (from the repository root):
    python launch.py                      # = --config=configs/shapes.py --workdir=runs/shapes

Expected result, measured on the 2-core CPU development machine (jax 0.10.2, an
AMD EPYC family 25 model 1, AVX2 only) on 2026-11-26: `python launch.py` took
6 min 32 s alone (`bench/default_job.py`; ~1 min more for the venv and a cached
pip install on a fresh clone). That is building the 11,000-scene data set (~30 s,
once), 3,500 steps of batch 32 with a CIDEr-D check every 500, and evaluating the
500 val images greedily and with beam 3:
               greedy   beam3
    Bleu_1     0.8474  0.8112
    Bleu_2     0.7711  0.7430
    Bleu_3     0.6799  0.6623
    Bleu_4     0.5586  0.5554
    METEOR     0.4557  0.4464
    ROUGE_L    0.7606  0.7469
    CIDEr      3.7498  3.5762
The run is deterministic: the same command and code on the same CPU give these
numbers to the last digit. Other code or another CPU moves them. The train step
of 2026-11-26 (round 6 in BENCHMARKS.md) sums its gradients in another order,
and XLA:CPU compiles for the host's vector units. On this CPU the code before
round 6 gave greedy CIDEr 3.7933 and beam-3 3.5750. On the VM of 2026-11-25 it gave
(5 min 46 s):
               greedy   beam3
    Bleu_1     0.8335  0.7953
    Bleu_2     0.7526  0.7252
    Bleu_3     0.6572  0.6420
    Bleu_4     0.5300  0.5334
    METEOR     0.4426  0.4353
    ROUGE_L    0.7446  0.7381
    CIDEr      3.5485  3.3991
On an AMD EPYC family 25 model 17 (Zen 4, AVX-512) on 2026-11-26, today's code
gave, three times, in 3 min 20-51 s:
               greedy   beam3
    Bleu_1     0.8414  0.7976
    Bleu_2     0.7628  0.7273
    Bleu_3     0.6691  0.6450
    Bleu_4     0.5420  0.5359
    METEOR     0.4448  0.4300
    ROUGE_L    0.7449  0.7323
    CIDEr      3.5444  3.3454
Beam 3 (GNMT length penalty, alpha 0.6) scores below
greedy on these scenes (except in the older table's Bleu_4); we have not looked
into why.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # data: synthetic scenes rendered by the `shapes_captions` TFDS builder.
    config.data = ml_collections.ConfigDict()
    config.data.name = 'shapes'
    config.data.tfds_dir = ''          # '' = TFDS' default (~/tensorflow_datasets)
    config.data.manual_dir = ''        # COCO: pre-downloaded zips ('' = <tfds_dir>/downloads/manual)
    config.data.image_size = 64
    config.data.num_train = 10000
    config.data.num_val = 500
    config.data.num_test = 500
    config.data.build_seed = 0         # seed of the rendered scenes (not of training)
    config.data.max_words = 1000       # vocabulary size cap (the data set has fewer words)
    config.data.max_len = 22           # tokens incl. <start> and <end>
    config.data.num_threads = 2        # grain reader threads
    config.data.prefetch = 8           # grain prefetch buffer (batches)
    config.data.train_split = 'train'  # TFDS split(s) to train on, e.g. 'train+restval' for COCO
    config.data.train_fraction = 1.0   # a seeded random subset of the train split (COCO reference: 0.5)
    config.data.features_dir = ''      # '' = run the encoder on images; else cached grids (--mode=extract)

    # model: small ResNet (64x64 -> 8x8 grid), attention LSTM decoder.
    config.model = ml_collections.ConfigDict()
    config.model.encoder = ml_collections.ConfigDict()
    config.model.encoder.stage_sizes = (1, 1)
    config.model.encoder.num_filters = 8
    config.model.encoder.preprocess = 'unit'
    config.model.encoder.train_stages = -1   # ResNet stages trained, from the top: -1 all, 0 frozen
    config.model.encoder.weights = ''        # Flax variables from --mode=convert ('' = random init)
    config.model.dtype = 'float32'     # compute dtype: 'float32' or 'bfloat16' (params stay float32)
    config.model.embed_dim = 128
    config.model.units = 128
    config.model.attention_units = 64
    config.model.position_embedding = True   # spatial relations need to know where
    config.model.beam_size = 1         # 1 = greedy decoding
    config.model.max_decode_len = 22   # tokens generated at most, <end> included
    config.model.length_penalty = 'gnmt'        # beam ranking: 'none', 'gnmt' or 'average'
    config.model.length_penalty_alpha = 0.6     # the 'gnmt' exponent (Wu et al. 2016)
    config.model.block_repeated_trigrams = False  # beam search: no trigram twice in a caption

    # optim: Adam, masked cross-entropy.
    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 100
    config.optim.decay = 'cosine'      # 'cosine' to 10% of the peak at num_steps, or 'constant'
    config.optim.grad_clip_norm = 5.0  # 0 disables clipping
    config.optim.attention_reg = 0.0   # doubly stochastic attention weight (Show, Attend and Tell)
    config.optim.encoder_lr_scale = 1.0  # encoder learning rate = this x the schedule's

    # train: steps and logging.
    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 32
    config.train.num_steps = 3500
    config.train.log_every_steps = 100
    config.train.validate_every_steps = 500  # CIDEr-D on a val subset every N steps (0 = off)
    config.train.validate_examples = 100    # val images decoded for that check

    # parallel: data parallelism over every device of every host.
    config.parallel = ml_collections.ConfigDict()
    config.parallel.mode = 'shard_map'     # 'shard_map' (jit) or 'pmap': the same per-device step
    config.parallel.coordinator_address = ''  # 'host:port' to call jax.distributed.initialize
    config.parallel.num_processes = 0         # with the coordinator; 0 = from the environment
    config.parallel.process_id = -1           # with the coordinator; -1 = from the environment
    config.parallel.deterministic_gpu = False  # XLA flags for deterministic (slower) GPU ops

    # eval: split, decoding and heatmaps after training.
    config.eval = ml_collections.ConfigDict()
    config.eval.split = 'val'
    config.eval.batch_size = 100
    config.eval.num_examples = 0       # 0 = the whole split
    config.eval.num_heatmaps = 4
    config.eval.beam_sizes = (1, 3)    # decode the split once per width (1 = greedy)
    config.eval.report = True          # eval/<split>_report.html with images and heatmaps

    # ckpt: orbax checkpoints in workdir/checkpoints.
    config.ckpt = ml_collections.ConfigDict()
    config.ckpt.every_steps = 500
    config.ckpt.max_to_keep = 2
    config.ckpt.keep_best = True       # also keep the best checkpoint by validation CIDEr
    return config
