"""Train step at the reference's shapes, on cached features, against the TF baseline in the same run.

    python bench/train_step.py                  # batch 64, 35 tokens, vocab 5000, 49x2048 grids
    python bench/train_step.py --no-baseline    # ours only (no ratio)

Compiles the jitted, donated train step (`jaxcap.train.train_step` on a cached-grid
`Captioner`, Adam 1e-3 as the reference) once, ahead of time, and times that executable
for `--steps` steps, then the baseline's
step (`seed_tf_baseline.py --steps N`), then ours again; `ratio_vs_baseline` is the
baseline's median step time over ours (the median of both rounds). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import common


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=common.BATCH)
    parser.add_argument('--steps', type=int, default=10, help='timed steps per round (2 rounds)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps before the first round')
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    common.add_baseline_flags(parser)
    return parser.parse_args()


def build(batch_size: int, dtype: str):
    """(jitted donated step, state, device batch, model) at the reference's shapes."""
    import jax
    import ml_collections

    from jaxcap import train
    from jaxcap.models import captioner
    model = captioner.Captioner(vocab_size=common.VOCAB, stage_sizes=(), dtype=dtype)
    # The reference's optimiser: Adam 1e-3, constant, no clipping.
    optim = ml_collections.ConfigDict({'learning_rate': 1e-3, 'warmup_steps': 0, 'decay': 'constant',
                                       'grad_clip_norm': 0.0})
    tx = train.make_optimizer(optim, num_steps=1)
    batch = jax.device_put(common.reference_batch(batch=batch_size))
    state = train.create_train_state(model, tx, 0, batch['features'][:1], batch['tokens'][:1, :-1])
    step = jax.jit(functools.partial(train.train_step, model=model, attention_reg=0.0),
                   donate_argnums=0)
    return step, state, batch, model


def recurrence_rows(mask_BxT) -> int:
    """Rows the recurrence's steps run on, summed over the steps (`decoder.phase_rows`)."""
    import numpy as np

    from jaxcap.models import decoder
    mask = np.asarray(mask_BxT) > 0
    steps_B = np.where(mask.any(axis=1), mask.shape[1] - np.argmax(mask[:, ::-1], axis=1), 0)
    phases = decoder.phase_rows(mask.shape[0])
    live_T = (np.arange(mask.shape[1])[:, None] < steps_B[None, :]).sum(axis=1)
    return int(sum(min((r for r in phases if r >= n), default=0) for n in live_T))


class Runner:
    """Steps a donated state; each call is synchronised on the loss, as the baseline's."""

    def __init__(self, step, state, batch):
        self.step, self.state, self.batch, self.losses = step, state, batch, []

    def __call__(self):
        self.state, metrics = self.step(self.state, self.batch)
        self.losses.append(float(metrics['loss']))  # a host sync, like the baseline's .numpy()
        return metrics


def main():
    args = parse_args()
    step, state, batch, _ = build(args.batch, args.dtype)
    # One compilation, used for the analysis and every step: an executable compiled ahead of
    # time cannot retrace, it raises on any other input shape or type.
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    runner = Runner(compiled, state, batch)
    start = time.perf_counter()
    common.block(runner())
    first_step_s = time.perf_counter() - start
    common.time_calls(runner, args.warmup - 1)
    common.log('our step, round 1')
    ours = common.time_calls(runner, args.steps)
    baseline = None
    if not args.no_baseline:
        baseline = common.run_baseline(args.baseline, ['--batch', str(args.batch), '--steps',
                                                       str(args.steps), '--warmup', '2',
                                                       '--decode-images', '1', '--decode-batch-reps', '1'],
                                       huge_pages=args.baseline_huge_pages)
        common.log('our step, round 2')
        ours += common.time_calls(runner, args.steps)
    median_s = statistics.median(ours)
    from jaxcap import packing
    real_tokens = int(batch['mask'][:, 1:].sum())
    logits_rows = packing.packed_rows(real_tokens, args.batch * (common.MAX_LEN - 1))
    step_rows = recurrence_rows(batch['mask'][:, 1:])
    flop = common.train_step_flop(args.batch, logits_rows=logits_rows, step_rows=step_rows)
    memory = compiled.memory_analysis()
    result = {
        'bench': 'train_step', 'batch': args.batch, 'caption_len': common.MAX_LEN,
        'vocab': common.VOCAB, 'dtype': args.dtype,
        'train_step_ms_median': common.ms(median_s),
        'train_step_ms_min_max': [common.ms(min(ours)), common.ms(max(ours))],
        'timed_steps': len(ours), 'compile_s': round(compile_s, 2), 'first_step_s': round(first_step_s, 2),
        'train_examples_per_s': round(args.batch / median_s, 1),
        'loss_first_last': [round(runner.losses[0], 4), round(runner.losses[-1], 4)],
        'real_tokens': real_tokens, 'logits_rows (packed loss)': logits_rows,
        'recurrence_rows (phased, summed over steps)': step_rows,
        'gflop_per_step_analytic': round(flop / 1e9, 2),
        'gflop_per_step_analytic_unpacked': round(common.train_step_flop(args.batch) / 1e9, 2),
        'gflop_per_step_xla_cost_analysis (loop bodies counted once)':
            round((common.xla_flop(compiled) or 0) / 1e9, 2),
        'achieved_gflops_analytic': round(flop / median_s / 1e9, 1),
        'matmul2048_gflops_jax': common.matmul_gflops(),
        'xla_temp_mb': round(memory.temp_size_in_bytes / 2**20, 1),
    }
    if baseline:
        result.update({
            'baseline_train_step_ms_median': baseline['train_step_ms_median'],
            'baseline_train_step_ms_min_max': [baseline['train_step_ms_min'], baseline['train_step_ms_max']],
            'baseline_gflop_per_step_est': baseline['train_step_gflop_est'],
            'baseline_achieved_gflops': baseline['train_achieved_gflops'],
            'baseline_matmul2048_gflops_tf': baseline['matmul2048_fp32_gflops_tf'],
            'baseline_peak_rss_mb': common.children_peak_rss_mb(),
            'baseline_huge_pages': args.baseline_huge_pages,
            'ratio_vs_baseline': round(baseline['train_step_ms_median'] / common.ms(median_s), 2),
        })
    common.emit(result)


if __name__ == '__main__':
    common.reexec_with_huge_pages()
    main()
