"""Greedy and beam-3 decoding at batch 64, against the TF baseline's decoders in the same run.

    python bench/decode.py
    python bench/decode.py --no-baseline

Decodes 64 images' cached grids with `jaxcap.decode.make_decoder` (the whole
caption in one jitted `lax.while_loop`) for 35 tokens: greedy, then beam search
with 3 beams, both with `decode.prepare`d variables, as evaluation decodes every
batch of a split; and greedy with the raw variables, as a single call would
(`greedy_unprepared`). `prepare_ms` is what preparing costs, once per set of
variables. The model is freshly initialised, so it practically never emits
<end> and every caption runs all 35 steps, as the baseline's do (checked and
reported as `mean_tokens`). The baseline (`seed_tf_baseline.py`) reports its
compiled batched greedy (35 steps unrolled in one tf.function, batch 64) and its
eager per-image loop (the reference's decoder: one Keras call and host sync per
token). `ratio_vs_baseline` is the baseline's batched greedy time over ours
(prepared); `unprepared_ratio_vs_baseline` the same for the raw variables.

`cpu_ms_per_call` is this process' CPU time per call (user and system, all
threads): it tells a run in one of the development VM's slow phases from a quiet
one. A quiet greedy call there takes ~400 ms of CPU in ~205 ms (both cores busy);
in a slow phase 500-530 ms of CPU in ~290 ms, with no page faults and no stolen
time: the same work in more cycles, mostly in the elementwise passes
(BENCHMARKS.md, round 13).
"""

from __future__ import annotations

import argparse
import statistics
import time

import common


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=common.BATCH)
    parser.add_argument('--max-len', type=int, default=common.MAX_LEN)
    parser.add_argument('--beam-size', type=int, default=3)
    parser.add_argument('--repeats', type=int, default=5, help='timed calls per decoder per round')
    parser.add_argument('--eager-images', type=int, default=10,
                        help="images for the baseline's eager per-image loop")
    common.add_baseline_flags(parser)
    return parser.parse_args()


def build(args):
    """(decoding calls by name, the prepare call)."""
    import jax
    import jax.numpy as jnp

    from jaxcap import decode
    from jaxcap.models import captioner
    model = captioner.Captioner(vocab_size=common.VOCAB, stage_sizes=())
    grids = jax.device_put(common.reference_batch(seed=1, batch=args.batch)['features'])
    variables = captioner.init_variables(model, 0, grids[:1], jnp.zeros((1, args.max_len - 1), jnp.int32))
    prepared = decode.prepare(model, variables)
    greedy = decode.make_decoder(model, args.max_len, beam_size=1)
    beam = decode.make_decoder(model, args.max_len, beam_size=args.beam_size)
    calls = {'greedy': lambda: greedy(prepared, grids),
             'greedy_unprepared': lambda: greedy(variables, grids),
             f'beam{args.beam_size}': lambda: beam(prepared, grids)}
    return calls, lambda: decode.prepare(model, variables)


def main():
    args = parse_args()
    import numpy as np

    from jaxcap.data import text
    calls, prepare = build(args)
    first_call_s, mean_tokens = {}, {}
    for name, call in calls.items():
        start = time.perf_counter()
        out = common.block(call())
        first_call_s[name] = round(time.perf_counter() - start, 2)
        mean_tokens[name] = float(np.mean(np.sum(np.asarray(out.tokens_BxL) != text.PAD, axis=1)))
    prepare_s = common.time_calls(prepare, 3)
    times, cpu = {name: [] for name in calls}, {name: [] for name in calls}

    def round_of_timings():
        # Each decoder's calls back to back: a 10 s beam search just before a greedy
        # call leaves it cold caches (and its freed memory to fault in again).
        for name, call in calls.items():
            times[name] += common.time_calls(call, args.repeats, cpu[name])

    common.log('our decoders, round 1')
    round_of_timings()
    baseline = None
    if not args.no_baseline:
        baseline = common.run_baseline(args.baseline, [
            '--batch', '8', '--steps', '1', '--warmup', '0', '--decode-images', str(args.eager_images),
            '--decode-batch', str(args.batch), '--decode-batch-reps', str(args.repeats)],
            huge_pages=args.baseline_huge_pages)
        common.log('our decoders, round 2')
        round_of_timings()
    beam_name = f'beam{args.beam_size}'
    greedy, beam = statistics.median(times['greedy']), statistics.median(times[beam_name])
    unprepared = statistics.median(times['greedy_unprepared'])
    flop = common.decode_flop(args.batch, args.batch, args.max_len, word_matmul=False)
    result = {
        'bench': 'decode', 'batch': args.batch, 'max_len': args.max_len, 'vocab': common.VOCAB,
        'mean_tokens': mean_tokens, 'first_call_s (compile+decode)': first_call_s,
        'greedy_ms_per_batch': common.ms(greedy),
        f'{beam_name}_ms_per_batch': common.ms(beam),
        'greedy_unprepared_ms_per_batch': common.ms(unprepared),
        'prepare_ms': common.median_ms(prepare_s),
        'greedy_ms_per_image': common.ms(greedy / args.batch),
        f'{beam_name}_ms_per_image': common.ms(beam / args.batch),
        'ms_min_max': {name: [common.ms(min(t)), common.ms(max(t))] for name, t in times.items()},
        'cpu_ms_per_call': {name: common.median_ms(c) for name, c in cpu.items()},
        'timed_calls_each': len(times['greedy']),
        f'{beam_name}_over_greedy': round(beam / greedy, 2),
        'greedy_gflop_analytic': round(flop / 1e9, 2),
        'greedy_achieved_gflops': round(flop / greedy / 1e9, 1),
    }
    if baseline:
        eager_per_image_ms = baseline['greedy_decode_ms_per_image']
        batched_ms = baseline['batched_greedy_ms_per_batch64']
        result.update({
            'baseline_batched_greedy_ms_per_batch': batched_ms,
            'baseline_batched_greedy_ms_min_max': baseline['batched_greedy_ms_min_max'],
            'baseline_eager_greedy_ms_per_image': eager_per_image_ms,
            'baseline_peak_rss_mb': common.children_peak_rss_mb(),
            'baseline_huge_pages': args.baseline_huge_pages,
            'ratio_vs_baseline': round(batched_ms / common.ms(greedy), 2),
            'unprepared_ratio_vs_baseline': round(batched_ms / common.ms(unprepared), 2),
            'greedy_per_image_vs_baseline_eager': round(eager_per_image_ms / (1e3 * greedy / args.batch), 1),
            f'{beam_name}_per_image_vs_baseline_eager': round(eager_per_image_ms / (1e3 * beam / args.batch),
                                                              1),
        })
    common.emit(result)


if __name__ == '__main__':
    common.reexec_with_huge_pages()
    main()
