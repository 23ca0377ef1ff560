"""Training: state, masked cross-entropy, the jitted step, and the loop that delegates."""

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
from clu import metric_writers
from tqdm import tqdm

from jaxcap import checkpoint, evaluate, parallel
from jaxcap import workdir as workdir_lib
from jaxcap.data import pipeline
from jaxcap.models import captioner


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
        return optax.linear_schedule(0.0, peak, max(warmup, 1))
    raise ValueError(f"optim.decay must be 'cosine' or 'constant', got {optim_config.decay!r}.")


def make_optimizer(optim_config: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    """Adam on the schedule, after optional global-norm gradient clipping."""
    clip = optim_config.grad_clip_norm
    parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
    return optax.chain(*parts, optax.adam(make_schedule(optim_config, num_steps)))


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, seed: int,
                       images: jax.Array, tokens: jax.Array) -> TrainState:
    """Initialises parameters from `seed` with example-shaped inputs (their values are unused)."""
    variables = captioner.init_variables(model, seed, images, tokens, train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params), tx=tx)


def masked_cross_entropy(logits_BxTxV, targets_BxT, mask_BxT):
    """Sum of per-token cross-entropy over unmasked tokens, and their count.

    `jnp.where`, not a multiplication, so that whatever a padded position
    computes (even inf or NaN) cannot leak into the loss or its gradient.
    """
    ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
    return jnp.where(mask_BxT > 0, ce_BxT, 0.0).sum(), mask_BxT.sum()


def attention_penalty(alpha_BxTxR, mask_BxT):
    """Doubly stochastic attention (Show, Attend and Tell): every region attended ~once in total."""
    total_BxR = jnp.where(mask_BxT[..., None] > 0, alpha_BxTxR, 0.0).sum(axis=1)
    return ((1.0 - total_BxR) ** 2).sum(axis=-1).mean()


def compute_loss(params, batch_stats, batch, model: nn.Module, attention_reg: float, train: bool):
    """Masked mean cross-entropy (+ optional attention penalty) of predicting tokens[1:] from tokens[:-1]."""
    tokens_BxT = batch['tokens']
    inputs, targets, mask = tokens_BxT[:, :-1], tokens_BxT[:, 1:], batch['mask'][:, 1:]
    variables = {'params': params, 'batch_stats': batch_stats}
    (logits, alpha), updates = model.apply(
        variables, batch['images'], inputs, train=train, mutable=['batch_stats'] if train else [])
    ce_sum, count = masked_cross_entropy(logits, targets, mask)
    ce = ce_sum / jnp.maximum(count, 1.0)
    loss = ce + attention_reg * attention_penalty(alpha, mask) if attention_reg else ce
    return loss, (ce, updates.get('batch_stats', batch_stats))


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               attention_reg: float) -> tuple[TrainState, dict[str, jax.Array]]:
    """One Adam step on a (global) batch; pure, so it can be jitted and sharded."""
    grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
    (_, (ce, batch_stats)), grads = grad_fn(state.params, state.batch_stats, batch, model,
                                            attention_reg, True)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': ce, 'grad_norm': optax.tree.norm(grads),
               'update_norm': optax.tree.norm(updates), 'param_norm': optax.tree.norm(params)}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, metrics


def jit_train_step(model: nn.Module, attention_reg: float, mesh: jax.sharding.Mesh):
    """The jitted step: batch sharded over the mesh's data axis, state replicated and donated."""
    step = functools.partial(train_step, model=model, attention_reg=attention_reg)
    return jax.jit(step, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                   out_shardings=parallel.replicated(mesh), donate_argnums=0)


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
    """A fresh state from `config.seed`, replicated over the mesh."""
    size, max_len = config.data.image_size, config.data.max_len
    images = jnp.zeros((1, size, size, 3), jnp.uint8)
    tokens = jnp.zeros((1, max_len - 1), jnp.int32)
    tx = make_optimizer(config.optim, config.train.num_steps)
    return parallel.replicate(create_train_state(model, tx, config.seed, images, tokens), mesh)


def run_training(config, model, state: TrainState, data_iterator, checkpointer, writer, mesh,
                 preemption: 'PreemptionGuard') -> TrainState:
    """Steps until `train.num_steps`, logging and checkpointing; returns the final state."""
    step_fn = jit_train_step(model, config.optim.attention_reg, mesh)
    schedule = make_schedule(config.optim, config.train.num_steps)
    total, start = config.train.num_steps, int(state.step)
    throughput = Throughput(config.train.batch_size, start)
    bar = tqdm(total=total, initial=start, desc='train', disable=jax.process_index() > 0,
               dynamic_ncols=True, mininterval=2.0)
    for step in range(start + 1, total + 1):
        batch = parallel.shard_batch(next(data_iterator), mesh)
        state, metrics = step_fn(state, batch)
        bar.update(1)
        is_last = step == total
        if step % config.train.log_every_steps == 0 or is_last:
            host = {k: float(v) for k, v in jax.device_get(metrics).items()}
            check_finite(step, host)
            host['examples_per_s'] = throughput(step)
            host['learning_rate'] = float(schedule(step - 1))  # the rate step used
            log_scalars(writer, step, host)
            bar.set_postfix(loss=f'{host["loss"]:.3f}', ex_s=f'{host["examples_per_s"]:.0f}')
        if step % checkpointer.every_steps == 0 or is_last or preemption.requested:
            # Never checkpoint a diverged state: the check costs one sync per save.
            check_finite(step, {'loss': float(metrics['loss'])})
            checkpointer.save(step, state, data_iterator)
        if preemption.requested:
            checkpointer.close()
            raise SystemExit(f'Stopped by {preemption.requested} at step {step}; saved a checkpoint. '
                             'Run the same command again to resume.')
    bar.close()
    return state


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
    workdir_lib.prepare_training(workdir, config)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.train.batch_size, mesh)
    source = pipeline.load_source(config.data, 'train')
    vocab = workdir_lib.load_or_build_vocab(
        workdir, lambda: pipeline.build_vocabulary(source, config.data.max_words))
    model = captioner.from_config(config.model, len(vocab))
    state = initial_state(config, model, mesh)
    data_iterator = iter(pipeline.train_dataset(
        source, vocab, config.data, config.train.batch_size // jax.process_count(), config.seed,
        jax.process_index(), jax.process_count()))
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                           config.ckpt.every_steps, config.ckpt.max_to_keep)
    # Resume precedence: the workdir's latest checkpoint (model state and data position),
    # else a fresh start from config.seed.
    if checkpointer.latest_step() is not None:
        state = checkpointer.restore(state, data_iterator)
        logging.info('Resumed from %s at step %d.', workdir, int(state.step))
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    writer.write_hparams(_flat_hparams(config))
    with PreemptionGuard() as preemption:
        state = run_training(config, model, state, data_iterator, checkpointer, writer, mesh,
                             preemption)
    checkpointer.close()
    scores = evaluate.evaluate_split(config, model, vocab, state.variables(), workdir,
                                     writer=writer, step=int(state.step))
    writer.flush()
    return scores


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    flat = {}

    def visit(node, prefix):
        for k, v in node.items():
            if isinstance(v, ml_collections.ConfigDict):
                visit(v, f'{prefix}{k}.')
            else:
                flat[f'{prefix}{k}'] = str(v) if isinstance(v, (tuple, list)) else v
    visit(config, '')
    return flat
