"""Two real processes x 2 fake CPU devices train like one process with 4 devices.

Five `python launch.py` processes of the tiny config run at once (process starts
and compiles are what cost time here):

    reference   one process, 4 devices, parallel.mode=shard_map
    shard_map   processes 0 and 1 of a 2-process job, 2 devices each
    pmap        the same with parallel.mode=pmap

The two-process jobs call `jax.distributed.initialize` on 127.0.0.1 and
all-reduce across processes with gloo. The global batch does not depend on the
process count (each process reads its rows of it), so all three runs see the
same examples and must end with the same parameters. Both modes are compared
with the shard_map reference: they map the same per-device step
(tests/test_parallel.py checks them equal in one process).

Not bitwise, though: the all-reduce adds the same per-device terms in another
order (gloo sums the two processes' partial sums), so the results differ by a few
float32 roundings. Most parameters stay within ~1e-7 of their scale. A few have a
gradient that is zero by construction, made of rounding noise only, and Adam,
which divides by the gradient's own size, turns that noise into steps of up to
the learning rate in either direction; see `_no_gradient`.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tiny
from jaxcap import checkpoint, inference
from jaxcap.data import pipeline
from jaxcap.models import resnet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 4
TIMEOUT_S = 600
# pmap's per-device step equals shard_map's on 8 devices (test_parallel.py); across
# processes it was checked once by hand (bitwise equal to shard_map's pair), and the
# two extra processes would double this test's time.
MODES = ('shard_map',)
VALIDATE_EVERY = 2   # the two-process jobs validate and checkpoint at step 2, then save step 4
# Of each leaf's largest magnitude. Observed: 1.2e-6 at most (a BatchNorm bias), ~1e-7
# for most leaves. A wrong data shard moves the parameters by ~1e-3 of their scale.
RTOL = 1e-5
# The logged metrics have 4 significant digits; two values a rounding apart can print
# one unit of the last digit apart.
LOG_RTOL = 2e-3
_METRICS_LINE = re.compile(r'step (\d+): (.*)')


def _no_gradient(path) -> str | None:
    """Why rounding noise, not the data, moves the leaf at `path` (None if it does not).

    - Its gradient is zero in exact arithmetic: a conv bias followed by BatchNorm
      (every conv of the encoder; BatchNorm subtracts the batch mean, the bias with
      it), or the attention's energy bias `V/bias` (softmax ignores a shift of all
      scores).
    - A BatchNorm running mean: it averages the conv outputs, those biases included,
      so it inherits `1 - momentum` of their drift.
    """
    names = [str(getattr(k, 'key', k)) for k in path]
    if names[:2] == ['params', 'encoder'] and names[-2].endswith('conv') and names[-1] == 'bias':
        return 'conv bias before BatchNorm'
    if names[-2:] == ['V', 'bias']:
        return 'attention energy bias'
    if names[0] == 'batch_stats' and names[-1] == 'mean':
        return 'BatchNorm running mean'
    return None


def _no_gradient_atol(reason: str) -> float:
    """How far Adam can move a zero-gradient leaf: at most ~the learning rate per step."""
    drift = NUM_STEPS * tiny.get_config().optim.learning_rate
    return drift * (1 - resnet.BN_MOMENTUM) if reason == 'BatchNorm running mean' else drift


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
    """Builds the tiny data set once, so that no two processes build it at the same time."""
    path = tmp_path_factory.mktemp('multihost_tfds')
    config = tiny.get_config()
    config.data.tfds_dir = str(path)
    for split in ('train', 'val', 'test'):
        pipeline.load_source(config.data, split)
    return path


def _free_ports(n: int) -> list[int]:
    """`n` distinct free ports (held open together, so the OS cannot hand one out twice)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(('127.0.0.1', 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _launch(workdir, tfds_dir, mode, num_devices, log_prefix, extra=()):
    """Starts `launch.py` on the tiny config; its stdout and stderr go to `<log_prefix>.out/.err`."""
    command = [sys.executable, 'launch.py', '--config=configs/tiny.py', f'--workdir={workdir}',
               f'--config.data.tfds_dir={tfds_dir}', f'--config.train.num_steps={NUM_STEPS}',
               f'--config.parallel.mode={mode}',
               # One checkpoint, no heatmaps or HTML report: seconds per process, and
               # nothing this test looks at.
               f'--config.ckpt.every_steps={NUM_STEPS}', '--config.eval.num_heatmaps=0',
               '--config.eval.report=False', *extra]
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
           # Replaces conftest's 8 devices; this test process keeps its own.
           'XLA_FLAGS': f'--xla_force_host_platform_device_count={num_devices}',
           # gloo is jax 0.10's default for cross-process CPU collectives; named here
           # because older releases had none by default (and failed on the first psum).
           'JAX_CPU_COLLECTIVES_IMPLEMENTATION': 'gloo'}
    with open(f'{log_prefix}.out', 'w') as out, open(f'{log_prefix}.err', 'w') as err:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err)


def _wait(jobs: dict[str, list[subprocess.Popen]]) -> None:
    """Waits for every process. When one fails, its partner (stuck in a collective) is killed."""
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for group in jobs.values() for p in group):
        for group in jobs.values():
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in group):
                for p in group:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
        time.sleep(0.5)


@pytest.fixture(scope='module')
def runs(tfds_dir, tmp_path_factory):
    """Runs the reference and both two-process jobs, all at once.

    Returns (root, {job: [(name, Popen)]}): job `j`'s workdir is `root/j`, and process
    `name` logged to `root/name.out` and `root/name.err`.
    """
    root = tmp_path_factory.mktemp('multihost')
    ports = dict(zip(MODES, _free_ports(len(MODES))))
    jobs = {'reference': [('reference', _launch(root / 'reference', tfds_dir, 'shard_map', 4,
                                                root / 'reference'))]}
    for mode in MODES:
        jobs[mode] = [
            (f'{mode}{i}', _launch(root / mode, tfds_dir, mode, 2, root / f'{mode}{i}', [
                f'--config.parallel.coordinator_address=127.0.0.1:{ports[mode]}',
                '--config.parallel.num_processes=2', f'--config.parallel.process_id={i}',
                # Validation in the loop, on every process (it does not change training),
                # and its score saved with the checkpoint of step VALIDATE_EVERY.
                f'--config.train.validate_every_steps={VALIDATE_EVERY}',
                '--config.train.validate_examples=4']))
            for i in range(2)]
    start = time.monotonic()
    _wait({job: [p for _, p in group] for job, group in jobs.items()})
    print(f'\n5 launch.py processes ({NUM_STEPS} steps + eval each) done in '
          f'{time.monotonic() - start:.0f} s')
    return root, jobs


def _check_exits(runs, *job_names) -> None:
    """Fails with every process's exit code and stderr tail unless all of `job_names` exited 0."""
    root, jobs = runs
    named = [(name, p) for job in job_names for name, p in jobs[job]]
    if any(p.returncode for _, p in named):
        logs = '\n'.join(f'--- {name} (exit {p.returncode}) stderr ---\n'
                         f'{_read(root, name, "err")[-6000:]}' for name, p in named)
        pytest.fail(f'launch.py failed (a negative exit: killed after its partner failed, or after '
                    f'{TIMEOUT_S} s)\n{logs}')


def _read(root, name, suffix) -> str:
    with open(os.path.join(root, f'{name}.{suffix}')) as f:
        return f.read()


def _logged_metrics(stderr: str) -> dict[int, dict[str, float]]:
    """{step: {metric: value}} from the loop's `step N: k=v, ...` lines (wall-clock rate dropped)."""
    logged = {}
    for step, fields in _METRICS_LINE.findall(stderr.replace('\r', '\n')):
        values = dict(field.split('=') for field in fields.strip().split(', '))
        values.pop('examples_per_s', None)
        logged[int(step)] = {k: float(v) for k, v in values.items()}
    return logged


def _assert_close(reference, variables) -> tuple[float, bool]:
    """Leaves with a gradient within RTOL, the others within Adam's drift (`_no_gradient`).

    Returns the largest relative difference of the leaves with a gradient, and
    whether every leaf is bitwise equal.
    """
    assert jax.tree.structure(variables) == jax.tree.structure(reference)
    worst, bitwise = 0.0, True
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(reference)[0],
                            jax.tree.leaves(variables)):
        a, b = np.asarray(a), np.asarray(b)
        diff, name = float(np.max(np.abs(a - b))), jax.tree_util.keystr(path)
        bitwise &= diff == 0
        if reason := _no_gradient(path):
            bound = _no_gradient_atol(reason)
            assert diff <= bound, f'{name} ({reason}): max |diff| = {diff:.3g} > {bound:.3g}'
        else:
            relative = diff / max(float(np.max(np.abs(a))), 1e-30)
            worst = max(worst, relative)
            assert relative <= RTOL, f'{name}: max |diff| / max |x| = {relative:.3g} > {RTOL}'
    return worst, bitwise


@pytest.mark.parametrize('mode', MODES)
def test_two_processes_end_with_the_parameters_of_one(runs, mode):
    _check_exits(runs, 'reference', mode)
    root, _ = runs
    _, vocab_one, _, reference = inference.restore(str(root / 'reference'))
    _, vocab_two, _, variables = inference.restore(str(root / mode))
    assert vocab_one.itos == vocab_two.itos
    assert max(int(s) for s in os.listdir(root / mode / 'checkpoints') if s.isdigit()) == NUM_STEPS

    worst, bitwise = _assert_close(reference, variables)
    print(f'{mode}: largest relative difference of the leaves with a gradient: {worst:.3g}; '
          f'bitwise equal: {bitwise}')

    # Adam hides a gradient's scale from the parameters; the logged gradient norm does not.
    expected = _logged_metrics(_read(root, 'reference', 'err'))
    logged = _logged_metrics(_read(root, f'{mode}0', 'err'))
    assert sorted(logged) == sorted(expected) and NUM_STEPS in logged
    for step, values in expected.items():
        assert logged[step] == pytest.approx(values, rel=LOG_RTOL), f'step {step}'


@pytest.mark.parametrize('mode', MODES)
def test_only_process_0_logs_and_writes_outputs(runs, mode):
    _check_exits(runs, mode)
    root, jobs = runs
    workdir = root / mode
    assert _logged_metrics(_read(root, f'{mode}0', 'err'))
    assert not _logged_metrics(_read(root, f'{mode}1', 'err'))
    assert 'val metrics' in _read(root, f'{mode}0', 'out')
    assert 'val metrics' not in _read(root, f'{mode}1', 'out')  # (gloo's own lines go there)
    # One TensorBoard file, named after its writer's pid: process 0's.
    events = [f for f in os.listdir(workdir) if f.startswith('events.out.tfevents')]
    assert len(events) == 1 and f'.{jobs[mode][0][1].pid}.' in events[0], events
    # Written once: every val image exactly once.
    with open(workdir / 'eval' / 'val_captions.json') as f:
        image_ids = [c['image_id'] for c in json.load(f)]
    assert len(image_ids) == len(set(image_ids)) == tiny.get_config().data.num_val
    with open(workdir / 'run_info.json') as f:
        info = json.load(f)
    assert (info['process_count'], info['device_count']) == (2, 4)
    checkpointer = checkpoint.Checkpointer(str(workdir / 'checkpoints'), NUM_STEPS, 2, keep_best=True)
    assert checkpointer.all_steps() == [VALIDATE_EVERY, NUM_STEPS]
    assert 'CIDEr' in checkpointer.metrics(VALIDATE_EVERY)
    checkpointer.close()
    # No leftover `<file>.tmp` of two processes writing one file.
    leftovers = [f for _, _, files in os.walk(workdir) for f in files if f.endswith('.tmp')]
    assert not leftovers, leftovers
