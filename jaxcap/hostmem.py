"""Transparent huge pages for host memory: XLA:CPU's per-step buffers without page faults.

A compiled XLA:CPU step allocates its temporaries (255 MB per train step at the
reference's shapes) and frees them when it returns. glibc serves blocks that
large with fresh `mmap`s, so every step faults in and zeroes about 65,000 4-KiB
pages: 0.2 CPU-s of kernel time and 12-20% of the step's wall time on the
2-core VM (`bench/train_step.py`). glibc's `glibc.malloc.hugetlb=1` tunable
(glibc >= 2.35) marks those blocks for transparent huge pages, 512 times fewer
faults. glibc reads tunables only when a process starts, so entry points
(`launch.py`, `bench/`) call `reexec_with_huge_pages` first thing: it re-runs
the same command, in the same process (same PID), with the tunable added.

Set JAXCAP_HUGE_PAGES=0 to opt out. Nothing happens where it cannot help:
not Linux/glibc, glibc older than 2.35, or transparent huge pages disabled.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = 'glibc.malloc.hugetlb=1'
OPT_OUT = 'JAXCAP_HUGE_PAGES'
# Set on the re-executed process: the value GLIBC_TUNABLES had before, so that
# subprocesses that should not inherit the tunable (the TF baseline) can be
# given the environment the user started with.
ORIGINAL = 'JAXCAP_ORIGINAL_GLIBC_TUNABLES'
_THP_MODE = '/sys/kernel/mm/transparent_hugepage/enabled'


def supported() -> bool:
    """Linux with glibc >= 2.35 and transparent huge pages not disabled."""
    if sys.platform != 'linux':
        return False
    libc, version = platform.libc_ver()
    try:
        major, minor = (int(part) for part in version.split('.')[:2])
    except ValueError:
        return False
    if libc != 'glibc' or (major, minor) < (2, 35):
        return False
    try:
        with open(_THP_MODE) as f:
            return '[never]' not in f.read()
    except OSError:
        return False


def environment_with_huge_pages(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to re-run with, or None if `environ` needs no change."""
    tunables = environ.get('GLIBC_TUNABLES', '')
    if environ.get(OPT_OUT) == '0' or 'glibc.malloc.hugetlb' in tunables:
        return None
    env = dict(environ)
    env['GLIBC_TUNABLES'] = f'{tunables}:{TUNABLE}' if tunables else TUNABLE
    env[ORIGINAL] = tunables
    return env


def reexec_with_huge_pages() -> None:
    """Re-runs this command with huge pages on, if they are supported and not on yet.

    Call it before anything else at the top of a script's `__main__` block:
    `os.execve` replaces the process, so nothing done before it survives.
    """
    env = environment_with_huge_pages(os.environ)
    if env is None or not supported():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def original_environment() -> dict[str, str]:
    """This process' environment as it was before `reexec_with_huge_pages` changed it."""
    env = dict(os.environ)
    if ORIGINAL in env:
        original = env.pop(ORIGINAL)
        if original:
            env['GLIBC_TUNABLES'] = original
        else:
            env.pop('GLIBC_TUNABLES', None)
    return env
