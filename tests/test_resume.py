"""Exact resume across real process deaths: SIGKILL at random steps, then SIGTERM, same bits.

One chain of `python launch.py` processes on one workdir (process starts are what
cost time here, so the kill points share a chain, and a persistent compilation
cache spares every run after the first its compiles):

    run 1..3  every_steps=1     SIGKILL once progress shows step >= k1, k2, k3
    run 4     every_steps=1000  SIGTERM at step >= k4: saves the step it stops at, and only that one
    run 5     every_steps=1000  the same command as run 4, to the end

A SIGKILL can land inside a save (the loop logs step k, then saves it), leaving a
half-written orbax tmp dir: the next run must ignore it. The loop logs a step's
metrics after dispatching the next step, and checks for SIGTERM before fetching
the batch after that, so it stops within two steps of the step shown. The final checkpoint must
equal, bit for bit, that of an uninterrupted run of the same command, which runs
alongside the chain.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from jaxcap.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 15   # > k4 + 2: the SIGTERM run must stop before the end
SEED = 4   # of the kill points; any seed must pass
RUN_TIMEOUT_S = 600
# The loop's metrics line (log_every_steps=1); tqdm's '\r' updates become lines in text mode.
_STEP_LINE = re.compile(r'(?:^|\s)step (\d+): ')


def _kill_points(rng):
    """Three SIGKILL steps and a later SIGTERM step, one from each quarter of the run."""
    return [rng.randint(1, 3), rng.randint(4, 6), rng.randint(7, 9), rng.randint(10, 12)]


def _command(workdir, tfds_dir, every_steps):
    return [sys.executable, 'launch.py', '--config=configs/tiny.py', f'--workdir={workdir}',
            f'--config.data.tfds_dir={tfds_dir}', f'--config.train.num_steps={NUM_STEPS}',
            f'--config.ckpt.every_steps={every_steps}', '--config.train.log_every_steps=1']


def _env(cache_dir):
    # The same device count in every run (and one device is fastest on a small CPU).
    return {**os.environ, 'JAX_PLATFORMS': 'cpu',
            'XLA_FLAGS': '--xla_force_host_platform_device_count=1',
            'JAX_COMPILATION_CACHE_DIR': str(cache_dir),
            'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
            'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}


def _start(command, env, **kwargs):
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               text=True, **kwargs)
    watchdog = threading.Timer(RUN_TIMEOUT_S, process.kill)   # never hang the test suite
    watchdog.daemon = True
    watchdog.start()
    return process


def _run_and_signal(command, env, at_step, signum, delay_s):
    """Runs `command`; sends `signum` `delay_s` after its progress shows step >= `at_step`.

    Returns (exit code, stderr, the step shown when the signal was sent or None).
    """
    process = _start(command, env, stderr=subprocess.PIPE)
    lines, shown = [], None
    for line in process.stderr:
        lines.append(line)
        match = _STEP_LINE.search(line)
        if match and int(match.group(1)) >= at_step:
            shown = int(match.group(1))
            time.sleep(delay_s)
            process.send_signal(signum)
            break
    lines.extend(process.stderr)
    return process.wait(), ''.join(lines), shown


def _wait_for_training(process, log_path):
    """Waits until the run logs a step: by then its compiled train step is in the cache."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while process.poll() is None and time.monotonic() < deadline:
        with open(log_path) as f:
            if _STEP_LINE.search(f.read()):
                return
        time.sleep(0.5)


def _steps(workdir):
    directory = os.path.join(workdir, 'checkpoints')
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _final_checkpoint(workdir):
    """The whole train state (params, batch_stats, Adam state, step) and the data position."""
    step_dir = os.path.join(workdir, 'checkpoints', str(NUM_STEPS))
    with ocp.StandardCheckpointer() as checkpointer:
        state = jax.device_get(checkpointer.restore(os.path.join(step_dir, 'state')))
    with open(os.path.join(step_dir, 'data', 'process_0-of-1.json')) as f:
        return state, json.load(f)


def _killed_chain(uninterrupted, root, resumed, tfds_dir, env):
    """Runs 1-5 of the module docstring on `resumed`; returns (kills, term, final) records."""
    _wait_for_training(uninterrupted, root / 'reference.log')   # its compiles are cached now
    rng = random.Random(SEED)
    *kill_steps, term_step = _kill_points(rng)
    kills = []
    for step in kill_steps:
        code, err, shown = _run_and_signal(_command(resumed, tfds_dir, 1), env, step,
                                           signal.SIGKILL, rng.uniform(0.0, 0.5))
        kills.append({'code': code, 'err': err, 'at': step, 'shown': shown,
                      'steps': _steps(resumed),
                      'entries': sorted(os.listdir(os.path.join(resumed, 'checkpoints')))})
    before_term = _steps(resumed)
    code, err, shown = _run_and_signal(_command(resumed, tfds_dir, 1000), env, term_step,
                                       signal.SIGTERM, 0.0)
    term = {'code': code, 'err': err, 'at': term_step, 'shown': shown, 'before': before_term,
            'steps': _steps(resumed)}
    final = subprocess.run(_command(resumed, tfds_dir, 1000), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    return kills, term, final


@pytest.fixture(scope='module')
def chain(tmp_path_factory):
    """Runs the uninterrupted run and the killed chain; returns what each run showed."""
    root = tmp_path_factory.mktemp('resume')
    tfds_dir, reference, resumed = root / 'tfds', str(root / 'reference'), str(root / 'resumed')
    env = _env(root / 'jax_cache')
    config = tiny.get_config()
    config.data.tfds_dir = str(tfds_dir)
    pipeline.load_source(config.data, 'train')   # build the data set once, before two runs read it
    with open(root / 'reference.log', 'w') as log:
        uninterrupted = _start(_command(reference, tfds_dir, 1), env, stderr=log)
        try:
            kills, term, final = _killed_chain(uninterrupted, root, resumed, tfds_dir, env)
            assert uninterrupted.wait() == 0, (root / 'reference.log').read_text()[-3000:]
        finally:
            if uninterrupted.poll() is None:   # the chain failed: do not leave it running
                uninterrupted.kill()
    assert final.returncode == 0, final.stderr[-3000:]
    return {'reference': reference, 'resumed': resumed, 'kills': kills, 'term': term,
            'final': final}


def test_sigkill_lands_mid_training_at_three_different_steps(chain):
    kills = chain['kills']
    assert len({kill['at'] for kill in kills}) == 3
    for kill in kills:
        # Shown on failure: whether the kill left a half-written save (`<step>.orbax-checkpoint-tmp`).
        print(f"killed at step {kill['shown']}: checkpoints/ held {kill['entries']}")
        assert kill['code'] == -signal.SIGKILL, kill['err'][-3000:]
        assert kill['shown'] is not None and kill['shown'] < NUM_STEPS, kill['err'][-3000:]
        assert not kill['steps'] or kill['steps'][-1] < NUM_STEPS


def test_sigterm_saves_a_checkpoint_at_the_step_it_stopped_at(chain):
    term = chain['term']
    assert term['code'] != 0, term['err'][-3000:]
    stopped = re.search(r'Stopped by SIGTERM at step (\d+)', term['err'])
    assert stopped, term['err'][-3000:]
    stop_step = int(stopped.group(1))
    # One step in flight and one queued behind the log line the signal answered.
    assert term['shown'] <= stop_step <= term['shown'] + 2
    assert stop_step < NUM_STEPS
    # every_steps=1000: the stop step is the one save this run made, and the newest.
    assert set(term['steps']) - set(term['before']) == {stop_step}
    assert term['steps'][-1] == stop_step


def test_the_resumed_chain_ends_bitwise_identical_to_the_uninterrupted_run(chain):
    state, data_position = _final_checkpoint(chain['resumed'])
    expected_state, expected_position = _final_checkpoint(chain['reference'])
    assert jax.tree.structure(state) == jax.tree.structure(expected_state)
    jax.tree.map(np.testing.assert_array_equal, state, expected_state)
    assert int(state['step']) == NUM_STEPS
    assert data_position == expected_position
