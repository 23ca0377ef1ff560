"""Huge pages for host memory: the environment change and the re-run of the same command."""

import json
import os
import subprocess
import sys

from jaxcap import hostmem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Re-runs itself through hostmem and reports what the re-run process sees.
_SCRIPT = """
import ctypes, json, os, sys
sys.path.insert(0, {repo!r})
from jaxcap import hostmem
pid = os.environ.setdefault('FIRST_PID', str(os.getpid()))
hostmem.reexec_with_huge_pages()

def huge_kb():
    with open('/proc/self/smaps_rollup') as f:
        return int(next(line.split()[1] for line in f if line.startswith('AnonHugePages')))

# A 64 MiB block from malloc, as XLA:CPU allocates its step buffers, touched whole.
before = huge_kb()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(ctypes.c_size_t(64 << 20))
ctypes.memset(block, 1, 64 << 20)
print(json.dumps({{'argv': sys.argv[1:], 'pid': os.getpid(), 'first_pid': int(pid),
                  'tunables': os.environ.get('GLIBC_TUNABLES'), 'huge_kb': huge_kb() - before,
                  'original': hostmem.original_environment().get('GLIBC_TUNABLES')}}))
"""


def _run(tmp_path, env_changes):
    script = tmp_path / 'script.py'
    script.write_text(_SCRIPT.format(repo=REPO))
    env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', hostmem.ORIGINAL,
                                                             hostmem.OPT_OUT)}
    env.update(env_changes)
    done = subprocess.run([sys.executable, '-u', str(script), '--flag=a b', 'x'], env=env,
                          capture_output=True, text=True, check=True, timeout=60)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_environment_adds_the_tunable_once_and_keeps_the_users_own():
    env = hostmem.environment_with_huge_pages({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2', 'A': '1'})
    assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
    assert env[hostmem.ORIGINAL] == 'glibc.malloc.arena_max=2' and env['A'] == '1'
    assert hostmem.environment_with_huge_pages(env) is None            # already on
    assert hostmem.environment_with_huge_pages({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}) is None
    assert hostmem.environment_with_huge_pages({hostmem.OPT_OUT: '0'}) is None


def test_the_command_reruns_in_the_same_process_with_huge_pages(tmp_path):
    seen = _run(tmp_path, {})
    assert seen['argv'] == ['--flag=a b', 'x']
    assert seen['pid'] == seen['first_pid']
    if hostmem.supported():
        assert seen['tunables'] == hostmem.TUNABLE
        assert seen['original'] is None  # what the baseline benchmark is given
        # Backed by 2-MiB pages: at least 60 of the block's 64 MiB (its ends may not be aligned).
        assert seen['huge_kb'] >= 60 * 1024, seen
    else:
        assert seen['tunables'] is None


def test_opting_out_leaves_the_environment_alone(tmp_path):
    seen = _run(tmp_path, {hostmem.OPT_OUT: '0', 'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})
    assert seen['tunables'] == 'glibc.malloc.arena_max=2'
    assert seen['pid'] == seen['first_pid']
