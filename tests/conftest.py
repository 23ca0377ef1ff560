"""Test setup: 8 fake CPU devices (set before jax is imported) and the repo on sys.path."""

import json
import os
import subprocess
import sys

import pytest

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# The tests check float32 maths. On GPUs, XLA rounds float32 matmul inputs to TF32 by
# default (~1e-4 relative); on CPU this changes nothing.
os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')
os.environ.setdefault('MPLBACKEND', 'Agg')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Tests that compare runs bitwise (a resumed run equals an uninterrupted one) need XLA's
# deterministic reductions and scatters on GPUs, whose atomic adds sum in any order: the
# flags users get from --config.parallel.deterministic_gpu. The CPU ignores them.
# (jax reads XLA_FLAGS when it starts its backends, not on import.)
from jaxcap import parallel  # noqa: E402

parallel.set_deterministic_gpu_flags()


@pytest.fixture
def tensorflow_modules_after():
    """Runs Python code in a fresh interpreter at the repo root; returns the `tensorflow`
    modules it left loaded (TensorFlow costs ~4 s of start-up, and GPU/TPU machines may
    not have it)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(code: str) -> list[str]:
        report = ('import json, sys; '
                  'print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow")))')
        done = subprocess.run([sys.executable, '-c', f'{code}\n{report}'], capture_output=True,
                              text=True, check=True, cwd=repo)
        return json.loads(done.stdout.strip().splitlines()[-1])
    return run
