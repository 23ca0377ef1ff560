"""Training: state, optimiser, the loss, the jitted step, and the loop that delegates."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from jaxcap import checkpoint, evaluate, losses, parallel, summaries
from jaxcap import workdir as workdir_lib
from jaxcap.data import pipeline, text
from jaxcap.models import captioner, decoder, resnet


class TrainState(flax.struct.PyTreeNode):
    """Everything that changes during training; `tx` is static (rebuilt from the config)."""
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    def variables(self) -> dict[str, Any]:
        """What `model.apply` takes for inference."""
        return {'params': self.params, 'batch_stats': self.batch_stats}


def make_schedule(optim_config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warmup, then cosine decay to 10% of the peak at `num_steps` (or constant)."""
    peak, warmup = optim_config.learning_rate, optim_config.warmup_steps
    if optim_config.decay == 'cosine':
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(num_steps, warmup + 1),
                                                  end_value=0.1 * peak)
    if optim_config.decay == 'constant':
        return optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
    raise ValueError(f"optim.decay must be 'cosine' or 'constant', got {optim_config.decay!r}.")


def make_optimizer(optim_config: ml_collections.ConfigDict, num_steps: int,
                   model_config: ml_collections.ConfigDict | None = None) -> optax.GradientTransformation:
    """Adam on the schedule, after optional global-norm gradient clipping.

    With `model_config`, the encoder's frozen layers get no update (and no Adam
    state) and its learning layers a learning rate `optim.encoder_lr_scale` times
    the decoder's.
    """
    clip = optim_config.grad_clip_norm
    parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
    adam = optax.adam(make_schedule(optim_config, num_steps))
    if model_config is None:
        return optax.chain(*parts, adam)
    partitions = {
        'decoder': adam,
        'encoder': optax.chain(adam, optax.scale(optim_config.encoder_lr_scale)),
        'frozen': optax.set_to_zero(),
    }
    return optax.chain(*parts, optax.multi_transform(
        partitions, functools.partial(param_labels, model_config=model_config)))


def param_labels(params, model_config: ml_collections.ConfigDict):
    """'frozen', 'encoder' or 'decoder' (projection, attention, LSTMs) for every parameter."""
    num_stages, train_stages = len(model_config.encoder.stage_sizes), model_config.encoder.train_stages

    def label(path, _):
        names = [getattr(k, 'key', k) for k in path]
        if names[0] != 'encoder':
            return 'decoder'
        return 'frozen' if resnet.is_frozen_layer(names[1], num_stages, train_stages) else 'encoder'
    return jax.tree_util.tree_map_with_path(label, params)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, seed: int,
                       images: jax.Array, tokens: jax.Array, encoder_weights: str = '') -> TrainState:
    """Initialises parameters from `seed` with example-shaped inputs (their values are unused).

    `encoder_weights` (a file from `--mode=convert`) then replaces the encoder's
    random parameters and BatchNorm statistics.
    """
    variables = captioner.init_variables(model, seed, images, tokens, train=False)
    params, batch_stats = variables['params'], variables.get('batch_stats', {})
    if encoder_weights:
        params, batch_stats = load_encoder(params, batch_stats, encoder_weights)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), tx=tx)


def load_encoder(params, batch_stats, path: str):
    """Puts converted ResNet variables (`weights.save_variables`) in place of the encoder's."""
    from jaxcap import weights  # h5py and msgpack, only when asked for
    loaded = weights.load_variables(os.path.expanduser(path))
    new = {}
    for name, tree in (('params', params), ('batch_stats', batch_stats)):
        want = jax.tree.map(lambda x: (x.shape, str(x.dtype)), flax.core.unfreeze(tree)['encoder'])
        got = jax.tree.map(lambda x: (x.shape, str(x.dtype)), loaded.get(name, {}))
        if want != got:
            raise ValueError(
                f'model.encoder.weights={path!r} does not fit model.encoder (different {name} '
                'layers or shapes); convert weights for this architecture with '
                '`python launch.py --mode=convert`, or set --config.model.encoder.weights=\'\'.')
        new[name] = {**tree, 'encoder': jax.tree.map(jnp.asarray, loaded[name])}
    return new['params'], new['batch_stats']


def _global_sum(x, axis_name: str | None):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def compute_loss(params, batch_stats, batch, model: nn.Module, attention_reg: float, train: bool,
                 axis_name: str | None = None):
    """Masked mean cross-entropy (+ optional attention penalty) of predicting tokens[1:] from tokens[:-1].

    The inputs are `batch['images']` or cached grids `batch['features']`. In a
    per-device step (`axis_name` given), the batch is this device's slice and
    the loss is its share of the global mean: the normalisers (token and
    example counts) are global, so summing the shares over devices gives the
    global batch's loss, and summing their gradients gives its gradient.
    Returns (loss share, (cross-entropy share, new batch_stats)).
    """
    # The mask decides what is padding, whatever the tokens there: PAD in place of them
    # keeps the embedding's gradient bitwise the same. A GPU's scatter-add sums a row's
    # contributions in an order that depends on which tokens are gathered, zeros included.
    tokens_BxT = jnp.where(batch['mask'] > 0, batch['tokens'], text.PAD)
    inputs, targets, mask = tokens_BxT[:, :-1], tokens_BxT[:, 1:], batch['mask'][:, 1:]
    variables = {'params': params, 'batch_stats': batch_stats}
    (hidden, alpha, (kernel, bias)), updates = model.apply(
        variables, batch['features'] if 'features' in batch else batch['images'], inputs,
        train=train, steps_B=_steps_needed(mask), mutable=['batch_stats'] if train else [],
        method=captioner.Captioner.teacher_forcing)
    logits_fn = functools.partial(decoder.project_logits, kernel_UxV=kernel, bias_V=bias,
                                  dtype=jnp.dtype(model.dtype))
    ce_sum, count = losses.packed_cross_entropy(hidden, targets, mask, logits_fn)
    ce = ce_sum / jnp.maximum(_global_sum(count, axis_name), 1.0)
    loss = ce
    if attention_reg:
        examples = _global_sum(jnp.float32(tokens_BxT.shape[0]), axis_name)
        loss = ce + attention_reg * losses.attention_penalty_sum(alpha, mask) / examples
    return loss, (ce, updates.get('batch_stats', batch_stats))


def _steps_needed(mask_BxT):
    """How many steps of teacher forcing each row's loss reads: up to its last real target."""
    positions_T = jnp.arange(1, mask_BxT.shape[1] + 1)
    return jnp.max(jnp.where(mask_BxT > 0, positions_T, 0), axis=1)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               attention_reg: float, axis_name: str | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One Adam step; pure, so it can be jitted and mapped.

    Without `axis_name` it takes the whole batch. With it, it is the per-device
    step of data parallelism (see `jaxcap.parallel.DataParallel`): it takes one
    device's slice and all-reduces the gradient shares explicitly, so every
    device applies the same global update.
    """
    if axis_name is not None:
        model = model.clone(bn_axis_name=axis_name)  # BatchNorm statistics of the global batch
    grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
    (_, (ce, batch_stats)), grads = grad_fn(state.params, state.batch_stats, batch, model,
                                            attention_reg, True, axis_name)
    grads, ce = _global_sum((grads, ce), axis_name)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': ce, 'grad_norm': optax.tree.norm(grads),
               'update_norm': optax.tree.norm(updates), 'param_norm': optax.tree.norm(params)}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, metrics


def data_parallel_step(model: nn.Module, attention_reg: float, mesh: jax.sharding.Mesh,
                       mode: str = 'shard_map') -> parallel.DataParallel:
    """The per-device train step, mapped over every device of `mesh` (`parallel.mode`)."""
    step = functools.partial(train_step, model=model, attention_reg=attention_reg,
                             axis_name=parallel.DATA_AXIS)
    return parallel.DataParallel(step, mesh, mode)


class NanLossError(FloatingPointError):
    pass


def check_finite(step: int, metrics: dict[str, float]) -> None:
    """Fails fast, naming the step and the fix, before a NaN state can be checkpointed."""
    if not np.isfinite(metrics['loss']):
        raise NanLossError(
            f'Training loss is {metrics["loss"]} at step {step}. Checkpoints before this step are '
            'kept; lower optim.learning_rate, or set optim.grad_clip_norm > 0, and rerun (the run '
            'resumes from the last good checkpoint).')


class Throughput:
    """Examples per second between two log points."""

    def __init__(self, batch_size: int, start_step: int):
        self.batch_size, self.last_time, self.last_step = batch_size, time.perf_counter(), start_step

    def __call__(self, step: int) -> float:
        now = time.perf_counter()
        rate = (step - self.last_step) * self.batch_size / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        return rate


def log_scalars(writer, step: int, metrics: dict[str, float]) -> None:
    """To TensorBoard, and one line on stderr (above the progress bar) on process 0."""
    writer.write_scalars(step, metrics)
    if jax.process_index() == 0:
        tqdm.write(f'step {step}: ' + ', '.join(f'{k}={v:.4g}' for k, v in metrics.items()),
                   file=sys.stderr)  # stdout is for results (the table, caption JSON lines)


def initial_state(config: ml_collections.ConfigDict, model: nn.Module, mesh) -> TrainState:
    """A fresh state from `config.seed` (and the converted encoder weights), replicated over the mesh."""
    size, max_len = config.data.image_size, config.data.max_len
    images = jnp.zeros((1, size, size, 3), jnp.uint8)
    tokens = jnp.zeros((1, max_len - 1), jnp.int32)
    tx = make_optimizer(config.optim, config.train.num_steps, config.model)
    state = create_train_state(model, tx, config.seed, images, tokens, config.model.encoder.weights)
    return parallel.replicate(state, mesh)


def run_training(config, model, state: TrainState, data_iterator, checkpointer, writer, mesh,
                 preemption: 'PreemptionGuard', validator=None) -> TrainState:
    """Steps until `train.num_steps`, logging, validating and checkpointing; returns the final state.

    `validator(state, step) -> {'CIDEr': ...}` runs every `train.validate_every_steps`;
    its scores go with that step's checkpoint, so the best one can be kept.
    """
    trainer = data_parallel_step(model, config.optim.attention_reg, mesh, config.parallel.mode)
    schedule = make_schedule(config.optim, config.train.num_steps)
    total, start = config.train.num_steps, int(state.step)
    validate_every = config.train.validate_every_steps if validator else 0
    throughput = Throughput(config.train.batch_size, start)
    bar = tqdm(total=total, initial=start, desc='train', disable=jax.process_index() > 0,
               dynamic_ncols=True, mininterval=2.0)
    state = trainer.put_state(state)
    log = functools.partial(_log_metrics, writer=writer, bar=bar, throughput=throughput,
                            schedule=schedule)
    batch = trainer.put_batch(next(data_iterator)) if start < total else None
    pending = None  # (step, metrics) of a log step, read once the next step is queued
    for step in range(start + 1, total + 1):
        state, metrics = trainer.step(state, batch)
        bar.update(1)
        if pending:
            # Reading metrics waits for their step: done now, after dispatching
            # this one, the device has work queued while the host logs.
            log(*pending)
            pending = None
        is_last = step == total
        if step % config.train.log_every_steps == 0 or is_last:
            pending = (step, metrics)
        scores = None
        if validate_every and step % validate_every == 0:
            scores = validator(trainer.get_state(state), step)
        if step % checkpointer.every_steps == 0 or is_last or preemption.requested or scores:
            # Never checkpoint a diverged state: the check costs one sync per save.
            check_finite(step, {'loss': float(jax.device_get(metrics['loss']))})
            checkpointer.save(step, trainer.get_state(state), data_iterator, metrics=scores)
        if preemption.requested:
            if pending:
                log(*pending)
            checkpointer.close()
            raise SystemExit(f'Stopped by {preemption.requested} at step {step}; saved a checkpoint. '
                             'Run the same command again to resume.')
        if not is_last:
            # The next batch goes to the device while this step runs. Fetched after
            # the checkpoint, which must record the data position of `step`.
            batch = trainer.put_batch(next(data_iterator))
    if pending:
        log(*pending)
    bar.close()
    return trainer.get_state(state)


def _log_metrics(step: int, metrics, *, writer, bar, throughput: Throughput, schedule) -> None:
    """One log point: checks the loss, then writes the metrics, throughput and learning rate."""
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    check_finite(step, host)
    host['examples_per_s'] = throughput(step)
    host['learning_rate'] = float(schedule(step - 1))  # the rate step used
    log_scalars(writer, step, host)
    bar.set_postfix(loss=f'{host["loss"]:.3f}', ex_s=f'{host["examples_per_s"]:.0f}')


class PreemptionGuard:
    """Records SIGTERM (how clusters preempt jobs) so the loop can checkpoint and stop."""

    def __init__(self):
        self.requested: str | None = None
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals need the main thread
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)



def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (resuming from `workdir` if it holds checkpoints), then evaluates; returns the scores."""
    check_encoder_mode(config)
    workdir_lib.prepare_training(workdir, config)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.train.batch_size, mesh)
    source = pipeline.training_source(config)
    vocab = workdir_lib.load_or_build_vocab(
        workdir, lambda: pipeline.build_vocabulary(source, config.data.max_words))
    model = captioner.from_config(config.model, len(vocab))
    state = initial_state(config, model, mesh)
    # Every process walks the same global batches and loads only its rows of each.
    data_iterator = iter(pipeline.train_dataset(
        source, vocab, config.data, config.train.batch_size // jax.process_count(), config.seed,
        jax.process_index(), jax.process_count()))
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                           config.ckpt.every_steps, config.ckpt.max_to_keep,
                                           keep_best=config.ckpt.keep_best)
    # Resume precedence: the workdir's latest good checkpoint (model state, optimizer, step
    # and data position); else the explicit init checkpoint, model.encoder.weights (in
    # `initial_state`, over a fresh decoder); else everything from scratch with config.seed.
    if checkpointer.latest_step() is not None:
        state = checkpointer.restore(state, data_iterator)
        logging.info('Resumed from %s at step %d.', workdir, int(state.step))
    writer = summaries.create_writer(workdir, just_logging=jax.process_index() > 0)
    writer.write_hparams(_flat_hparams(config))
    validator = None
    if config.train.validate_every_steps:
        validator = evaluate.Validator(model, vocab, config, writer)
    with PreemptionGuard() as preemption:
        state = run_training(config, model, state, data_iterator, checkpointer, writer, mesh,
                             preemption, validator)
    checkpointer.close()
    scores = {}
    if jax.process_index() == 0:  # one writer of eval/; the others wait for it
        scores = evaluate.evaluate_split(config, model, vocab, state.variables(), workdir,
                                         writer=writer, step=int(state.step))
    writer.close()
    parallel.sync('evaluated')
    return scores


def check_encoder_mode(config: ml_collections.ConfigDict, needs_cache: bool = False) -> None:
    """A feature cache stands in for a frozen encoder only."""
    if needs_cache and not config.data.features_dir:
        raise ValueError('--mode=extract writes to config.data.features_dir, which is empty; set '
                         '--config.data.features_dir=DIR.')
    if not config.model.encoder.stage_sizes and config.data.features_dir:
        raise ValueError('data.features_dir needs an encoder (model.encoder.stage_sizes) to cache.')
    if config.data.features_dir and config.model.encoder.train_stages != 0:
        raise ValueError(
            f'data.features_dir={config.data.features_dir!r} (cached encoder grids) needs a frozen '
            f'encoder, but model.encoder.train_stages={config.model.encoder.train_stages}. Set '
            "--config.model.encoder.train_stages=0, or --config.data.features_dir='' to fine-tune "
            'on images.')


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, bool | int | float | str]:
    """The config's leaves by dotted name; what TensorBoard cannot show (lists, None) as strings."""
    flat = {}

    def visit(node, prefix):
        for k, v in node.items():
            if isinstance(v, ml_collections.ConfigDict):
                visit(v, f'{prefix}{k}.')
            else:
                flat[f'{prefix}{k}'] = v if isinstance(v, (bool, int, float, str)) else str(v)
    visit(config, '')
    return flat
