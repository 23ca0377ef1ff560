"""The captioner: `encode(images)` -> region features, `decode(features, tokens)` -> logits."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxcap.data import images as image_ops
from jaxcap.models.decoder import Decoder, DecoderState, DecodingWeights
from jaxcap.models.resnet import ResNet


class PositionEmbedding(nn.Module):
    """Adds a learned vector per grid cell (the grid size is fixed by the first call)."""

    @nn.compact
    def __call__(self, regions_BxRxD):
        table = self.param('embedding', nn.initializers.normal(0.02), regions_BxRxD.shape[1:])
        return regions_BxRxD + table


class Captioner(nn.Module):
    """ResNet grid -> Dense+ReLU regions -> attention LSTM decoder.

    Attributes:
      vocab_size: number of token ids (special tokens included).
      stage_sizes: ResNet blocks per stage; empty means the inputs already are
        encoder grids (cached features), so only the projection is applied.
      num_filters: ResNet width (see `ResNet`).
      preprocess: pixel preprocessing mode (`jaxcap.data.images.PREPROCESS_MODES`).
      embed_dim: region feature and word embedding size (256 in the reference).
      units: LSTM units (512 in the reference).
      attention_units: W1/W2 size (512 in the reference).
      position_embedding: add a learned embedding per grid cell to the region
        features. The reference had none, so its context vector says what the
        model looked at but not where; spatial words ("left of") need the where.
      train_stages: encoder stages that learn, from the top (-1 all, 0 frozen).
      bn_axis_name: the mapped batch axis of a per-device training step (global
        BatchNorm statistics); None everywhere else.
      dtype: compute dtype of the projection and the decoder's matmuls
        ('bfloat16': mixed precision for GPU/TPU). Parameters, recurrent
        states, softmaxes and logits stay float32; the ResNet runs in float32.
    """
    vocab_size: int
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    num_filters: int = 64
    preprocess: str = 'caffe'
    embed_dim: int = 256
    units: int = 512
    attention_units: int = 512
    position_embedding: bool = False
    train_stages: int = -1
    bn_axis_name: str | None = None
    dtype: str = 'float32'

    def setup(self):
        if self.stage_sizes:
            self.encoder = ResNet(tuple(self.stage_sizes), self.num_filters, self.train_stages,
                                  self.bn_axis_name, name='encoder')
        self.project = nn.Dense(self.embed_dim, dtype=self.dtype, name='project')
        if self.position_embedding:
            self.position = PositionEmbedding(name='position')
        self.decoder = Decoder(self.vocab_size, self.embed_dim, self.units,
                               self.attention_units, dtype=jnp.dtype(self.dtype), name='decoder')

    def encode_grid(self, images, train: bool = False):
        """uint8 images (B,H,W,3) -> the encoder's grid (B,h,w,C): what the feature cache stores."""
        return self.encoder(image_ops.preprocess(images, self.preprocess), train=train)

    def encode(self, inputs, train: bool = False):
        """uint8 images (B,H,W,3), or float encoder grids (B,h,w,C) -> regions (B, h*w, embed_dim).

        Floating inputs are grids from the feature cache (`--mode=extract`): the
        encoder is skipped, so training, decoding and scoring all take either.
        """
        is_grid = not self.stage_sizes or jnp.issubdtype(inputs.dtype, jnp.floating)
        return self.regions(inputs if is_grid else self.encode_grid(inputs, train))

    def regions(self, grid_BxHxWxC):
        """Encoder grid -> region features (B, h*w, embed_dim)."""
        grid = grid_BxHxWxC.astype(jnp.float32)
        regions = nn.relu(self.project(grid.reshape(grid.shape[0], -1, grid.shape[-1])))
        # After the ReLU, so that even a featureless region still says where it is.
        return self.position(regions) if self.position_embedding else regions

    def decode(self, features_BxRxD, tokens_BxT, train: bool = False):
        """Teacher forcing over all steps: logits_BxTxV, alpha_BxTxR."""
        del train  # no dropout in the decoder (the reference had none)
        return self.decoder(features_BxRxD, tokens_BxT)

    def __call__(self, inputs, tokens_BxT, train: bool = False):
        """Teacher-forced logits_BxTxV, alpha_BxTxR from images or cached grids (see `encode`)."""
        return self.decode(self.encode(inputs, train), tokens_BxT, train)

    def teacher_forcing(self, inputs, tokens_BxT, train: bool = False, steps_B=None):
        """What the training loss takes: (hidden_BxTxU, alpha_BxTxR, (kernel, bias)).

        The top LSTM's states before the vocabulary projection, and that
        projection's parameters (`decoder.project_logits` applies them), so the
        loss projects only the rows it scores. `steps_B`: how many steps each
        caption needs (`Decoder.hidden_states`); later ones come out zero.
        """
        hidden_BxTxU, alpha_BxTxR = self.decoder.hidden_states(self.encode(inputs, train), tokens_BxT,
                                                               steps_B)
        return hidden_BxTxU, alpha_BxTxR, self.decoder.output_weights()

    # Inference entry points: the same step the scan runs in `decode`.
    def start(self, features_BxRxD) -> tuple[DecoderState, jax.Array]:
        """Initial decoder state and the attention keys (computed once per image)."""
        state = self.decoder.initial_state(features_BxRxD.shape[0])
        return state, self.decoder.attention_keys(features_BxRxD)

    def step(self, state, token_B, features_BxRxD, keys_BxRxA):
        """One decoding step: (new state, logits_BxV, alpha_BxR)."""
        return self.decoder.step(state, token_B, features_BxRxD, keys_BxRxA)

    def decoding_weights(self, word_gate_table: bool = False) -> DecodingWeights:
        """The parameters `decoder.decode_step` reads, prepared once for a decoding loop.

        decode_step(decoding_weights(), ...) is `step(...)`, without touching the
        parameters inside the loop. The decoder reads regions of `embed_dim`
        features (`regions`); `word_gate_table`: see `Decoder.decoding_weights`.
        """
        return self.decoder.decoding_weights(self.embed_dim, word_gate_table)


def from_config(model_config: ml_collections.ConfigDict, vocab_size: int) -> Captioner:
    """Builds the captioner a config describes (`config.model`)."""
    if model_config.dtype not in ('float32', 'bfloat16'):
        raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {model_config.dtype!r}.")
    return Captioner(
        vocab_size=vocab_size,
        stage_sizes=tuple(model_config.encoder.stage_sizes),
        num_filters=model_config.encoder.num_filters,
        preprocess=model_config.encoder.preprocess,
        embed_dim=model_config.embed_dim,
        units=model_config.units,
        attention_units=model_config.attention_units,
        position_embedding=model_config.position_embedding,
        train_stages=model_config.encoder.train_stages,
        dtype=model_config.dtype)


def init_variables(module: nn.Module, seed: int, *inputs, **kwargs):
    """`module.init` from an integer seed, jitted (one compile instead of one per op).

    Threefry's partitionable mode costs ~3x the compile time on CPU (seconds per
    distinct parameter shape) and buys nothing here: parameters are initialised
    whole and replicated. Turning it off changes the random values, so the seed
    -> parameters map is fixed by this function alone.
    """
    with jax.threefry_partitionable(False):
        return jax.jit(functools.partial(module.init, **kwargs))(jax.random.key(seed), *inputs)
