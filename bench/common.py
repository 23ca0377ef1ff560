"""Shared pieces of the benchmark scripts: timing, the TF baseline, FLOP counts, one JSON line.

Every script in bench/ prints exactly one JSON line on stdout (logs go to stderr)
and measures ratios inside one run: the TensorFlow baseline
(`../shared/bench/seed_tf_baseline.py`, a re-implementation of the reference's
train step and decoder) runs in a subprocess between two rounds of our own
timings, so a busy machine slows both sides alike as far as possible.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # `import jaxcap` without installing the package

DEFAULT_BASELINE = os.path.join(os.path.dirname(REPO), 'shared', 'bench', 'seed_tf_baseline.py')

# The reference's shapes (the baseline's constants).
BATCH, MAX_LEN, VOCAB = 64, 35, 5000
GRID, FEATURE_DIM = 7, 2048
EMBED_DIM, UNITS, ATTENTION_UNITS = 256, 512, 512
REGIONS = GRID * GRID


def reexec_with_huge_pages() -> None:
    """What `launch.py` does first (`jaxcap.hostmem`), so that we time what users run."""
    from jaxcap import hostmem
    hostmem.reexec_with_huge_pages()


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def emit(result: dict) -> None:
    """The one JSON line on stdout, with the machine and the peak RSS added."""
    result = {**result, **machine(), 'peak_rss_mb': peak_rss_mb()}
    print(json.dumps(result), flush=True)


def peak_rss_mb() -> float:
    """This process' peak resident set size (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def children_peak_rss_mb() -> float:
    """The largest peak RSS among finished child processes (the baseline)."""
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)


def machine() -> dict:
    import jax
    cpu = cpu_identity()
    return {'date': datetime.date.today().isoformat(), **cpu, 'cpu_count': os.cpu_count(),
            'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
            'load_avg_1m': round(os.getloadavg()[0], 2), 'jax': jax.__version__,
            'jax_device': str(jax.devices()[0].device_kind), 'python': platform.python_version()}


def cpu_identity() -> dict:
    """The CPU's name, family/model and widest vector units.

    VMs that all call themselves "AMD EPYC" can differ: the development VM's
    2048-matmul has read 109-220 GFLOP/s on different nights, and on the night
    of round 5 (a family 25 model 1, Zen 3, AVX2) the default job's metrics
    differed from those measured on an earlier night, with the same code
    (BENCHMARKS.md, round 5). XLA picks its kernels by the vector units.
    """
    fields = {'cpu': platform.processor() or '', 'cpu_family_model': '', 'cpu_vector_isa': ''}
    try:
        with open('/proc/cpuinfo') as f:
            info = dict(line.split(':', 1) for line in f.read().split('\n\n')[0].splitlines() if ':' in line)
    except OSError:
        return fields
    info = {key.strip(): value.strip() for key, value in info.items()}
    flags = set(info.get('flags', '').split())
    fields['cpu'] = info.get('model name', fields['cpu'])
    fields['cpu_family_model'] = f"{info.get('cpu family', '?')}/{info.get('model', '?')}"
    fields['cpu_vector_isa'] = next((isa for isa in ('avx512f', 'avx2', 'avx', 'sse4_2') if isa in flags), '')
    return fields


def block(tree):
    import jax
    return jax.block_until_ready(tree)


def time_calls(fn: Callable[[], object], repeats: int, cpu_s: list[float] | None = None
               ) -> list[float]:
    """Wall seconds of `repeats` calls, each synchronised (the result is waited for).

    `cpu_s`, if given, gets each call's CPU seconds appended (`time.process_time`:
    this process' user and system time, all threads).
    """
    times = []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        block(fn())
        times.append(time.perf_counter() - start)
        if cpu_s is not None:
            cpu_s.append(time.process_time() - start_cpu)
    return times


def ms(seconds: float) -> float:
    return round(1e3 * seconds, 2)


def median_ms(times_s: Sequence[float]) -> float:
    return ms(statistics.median(times_s))


def run_baseline(path: str, args: Sequence[str], timeout_s: int = 3600, huge_pages: bool = False) -> dict:
    """Runs the TF baseline in a subprocess and returns its JSON line.

    It runs in the environment this script was started with: without the huge
    pages `reexec_with_huge_pages` gave us, unless `huge_pages` (then with them,
    to see what they would do for the baseline).
    """
    from jaxcap import hostmem
    if not os.path.exists(path):
        raise FileNotFoundError(f'TF baseline not found at {path}; pass --baseline=PATH or --no-baseline.')
    command = [sys.executable, path, *args]
    env = dict(os.environ) if huge_pages else hostmem.original_environment()
    log('baseline:', ' '.join(command), '(GLIBC_TUNABLES=%s)' % env.get('GLIBC_TUNABLES', ''))
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False,
                          env=env)
    if done.returncode != 0:
        raise RuntimeError(f'baseline failed ({done.returncode}):\n{done.stderr[-3000:]}')
    return json.loads(done.stdout.strip().splitlines()[-1])


def add_baseline_flags(parser) -> None:
    parser.add_argument('--baseline', default=DEFAULT_BASELINE, help='the TF baseline script')
    parser.add_argument('--no-baseline', action='store_true', help='skip the baseline (no ratios)')
    parser.add_argument('--baseline-huge-pages', action='store_true',
                        help="run the baseline with jaxcap's huge-page malloc tunable too (jaxcap/hostmem.py)")


def reference_batch(seed: int = 0, batch: int = BATCH, max_len: int = MAX_LEN, vocab: int = VOCAB):
    """Random grids and captions like the baseline's: lengths 8..max_len with <start> and <end>."""
    import numpy as np

    from jaxcap.data import text
    rng = np.random.default_rng(seed)
    grids = rng.random((batch, GRID, GRID, FEATURE_DIM), dtype=np.float32)
    tokens = np.zeros((batch, max_len), np.int32)
    for i, n in enumerate(rng.integers(8, max_len + 1, size=batch)):
        tokens[i, 0], tokens[i, n - 1] = text.START, text.END
        tokens[i, 1:n - 1] = rng.integers(len(text.SPECIAL_TOKENS), vocab, size=n - 2)
    return {'features': grids, 'tokens': tokens, 'mask': (tokens != text.PAD).astype(np.float32)}


# ---------------------------------------------------------------------------
# Analytic FLOP counts (2 per multiply-add; matmuls only: the elementwise work
# of attention and the gates is a few percent and is left out, as in the baseline).

def step_macs(rows: int, word_matmul: bool = True) -> int:
    """One decoder step as jaxcap runs it (keys precomputed), per `rows` sequences.

    `word_matmul=False`: the words' share of lstm1's gates is gathered from a
    table (`jaxcap.decode.prepare`), not multiplied out.
    """
    attention = rows * (UNITS * ATTENTION_UNITS + REGIONS * ATTENTION_UNITS + REGIONS * EMBED_DIM)
    lstm1_inputs = EMBED_DIM + UNITS + (EMBED_DIM if word_matmul else 0)
    lstm = rows * (lstm1_inputs * 4 * UNITS + (UNITS + UNITS) * 4 * UNITS)
    return attention + lstm + rows * UNITS * VOCAB


def encode_macs(images: int) -> int:
    """Projection of the grids and the attention keys (once per image)."""
    return images * REGIONS * (FEATURE_DIM * EMBED_DIM + EMBED_DIM * ATTENTION_UNITS)


def train_step_flop(batch: int = BATCH, steps: int = MAX_LEN - 1, logits_rows: int | None = None,
                    step_rows: int | None = None) -> float:
    """Forward + backward of the train step: 3x the forward matmuls, except that the
    projection of the input grids needs no input gradient (2x). `logits_rows`: the
    rows the vocabulary projection runs on (jaxcap's packed loss skips padding;
    default all batch x steps); `step_rows`: the rows the recurrence's steps run
    on, summed over the steps (jaxcap's skips most padding; default the same)."""
    logits_rows = batch * steps if logits_rows is None else logits_rows
    step_rows = batch * steps if step_rows is None else step_rows
    # step_macs counts a vocabulary projection per row-step; the loss runs its own.
    forward_rest = (batch * REGIONS * EMBED_DIM * ATTENTION_UNITS + step_macs(step_rows)
                    - (step_rows - logits_rows) * UNITS * VOCAB)
    return 2.0 * (2 * batch * REGIONS * FEATURE_DIM * EMBED_DIM + 3 * forward_rest)


def decode_flop(images: int, rows: int, steps: int = MAX_LEN, word_matmul: bool = True) -> float:
    """Decoding `steps` tokens for `rows` sequences (beams) of `images` images."""
    return 2.0 * (encode_macs(images) + steps * step_macs(rows, word_matmul))


def xla_flop(compiled) -> float | None:
    """XLA's own count (cost analysis). It counts a loop body once, not once per
    iteration, so it undercounts anything inside a scan or while loop."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost['flops'])
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The best of `repeats` n x n float32 matmuls in JAX: the machine's practical peak."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    block(matmul(a))
    return round(2.0 * n ** 3 / min(time_calls(lambda: matmul(a), repeats)) / 1e9, 1)
