"""Data parallelism over every device of every host: one per-device step, two ways to map it.

The training step is written per device (pmap semantics): it sees its slice of
the global batch and all-reduces explicitly over `DATA_AXIS`. `DataParallel`
maps that same function either with `jax.shard_map` under `jax.jit` (the
default) or with `jax.pmap`, and converts the state between the mapped layout
and the one everything else uses: global arrays replicated over a mesh of all
devices (what checkpoints, evaluation and the tests see).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'
MODES = ('shard_map', 'pmap')
# XLA flags that make GPU reductions and scatters deterministic (at some speed cost).
DETERMINISTIC_GPU_FLAGS = ('--xla_gpu_deterministic_ops=true',
                           '--xla_gpu_exclude_nondeterministic_ops=true')


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, name: str = 'train.batch_size') -> None:
    """A global batch must split evenly over devices; say how to fix it if not."""
    n = mesh.size
    if batch_size % n:
        lower, upper = batch_size // n * n, (batch_size // n + 1) * n
        raise ValueError(
            f'{name}={batch_size} does not divide evenly across {n} devices; use a multiple of '
            f'{n} (e.g. --config.{name}={upper}' + (f' or {lower}' if lower else '') + ').')


def shard_batch(batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """This host's rows of the global batch -> global arrays split along the batch axis."""
    if jax.process_count() == 1:
        return jax.device_put(batch, batch_sharding(mesh))
    return multihost_utils.host_local_array_to_global_array(batch, mesh, P(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host values (equal on every process) -> global arrays replicated over the mesh."""
    return jax.device_put(tree, replicated(mesh))


def local_copy(tree: Any) -> Any:
    """A replicated global tree -> the copy on this process's first device (for local jits)."""
    return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)


class DataParallel:
    """Maps a per-device `step(state, batch) -> (state, metrics)` over a mesh's data axis.

    `step` must all-reduce what it needs over `DATA_AXIS` itself (gradients,
    loss terms, BatchNorm statistics); its outputs are then equal on every
    device. Both modes run exactly that function, so they give the same numbers.
    """

    def __init__(self, step: Callable, mesh: Mesh, mode: str = 'shard_map'):
        if mode not in MODES:
            raise ValueError(f'parallel.mode must be one of {MODES}, got {mode!r}.')
        self.mesh, self.mode = mesh, mode
        if mode == 'shard_map':
            # check_vma=False gives pmap's semantics: per-device gradients that the
            # step all-reduces itself. With it on, the gradient of a replicated
            # input would already be summed over devices, and the explicit
            # all-reduce would count it N times.
            mapped = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(DATA_AXIS)),
                                   out_specs=(P(), P()), check_vma=False)
            self._step = jax.jit(mapped, donate_argnums=0)
        else:
            if mesh.devices.size != jax.device_count():
                raise ValueError('parallel.mode=pmap maps over every device; use shard_map for a '
                                 'mesh over a subset of them.')
            self._step = jax.pmap(step, axis_name=DATA_AXIS, donate_argnums=0)

    def put_state(self, state: Any) -> Any:
        """A replicated global state (see `replicate`) -> the layout `step` takes."""
        if self.mode == 'shard_map':
            return state
        # One copy per local device along a leading axis: pmap's layout.
        n = jax.local_device_count()
        stacked = NamedSharding(make_mesh(jax.local_devices()), P(DATA_AXIS))
        host = jax.device_get(local_copy(state))
        return jax.tree.map(
            lambda x: jax.device_put(np.broadcast_to(x, (n, *np.shape(x))), stacked), host)

    def get_state(self, state: Any) -> Any:
        """The mapped layout -> a replicated global state (for checkpoints and evaluation)."""
        if self.mode == 'shard_map':
            return state
        return replicate(jax.device_get(_first_replica(state)), self.mesh)

    def put_batch(self, host_batch: dict[str, np.ndarray]) -> Any:
        """This host's rows of the global batch -> the layout `step` takes."""
        if self.mode == 'shard_map':
            return shard_batch(host_batch, self.mesh)
        n = jax.local_device_count()
        return jax.tree.map(lambda x: np.reshape(x, (n, -1, *x.shape[1:])), host_batch)

    def step(self, state: Any, batch: Any) -> tuple[Any, dict[str, jax.Array]]:
        state, metrics = self._step(state, batch)
        if self.mode == 'pmap':
            metrics = _first_replica(metrics)  # equal on every device after the all-reduce
        return state, metrics


def _first_replica(tree: Any) -> Any:
    """pmap's (devices, ...) layout -> the first local device's (...) value."""
    return jax.tree.map(lambda x: x.addressable_data(0).reshape(x.shape[1:]), tree)


def initialize_distributed(parallel_config) -> None:
    """`jax.distributed.initialize` when the config asks for several processes.

    Process count and id fall back to what JAX finds in the environment (SLURM,
    TPU pods, or JAX_NUM_PROCESSES/JAX_PROCESS_ID), so one command works per host.
    """
    if not parallel_config.coordinator_address:
        return
    num = parallel_config.num_processes or None
    pid = parallel_config.process_id if parallel_config.process_id >= 0 else None
    jax.distributed.initialize(parallel_config.coordinator_address, num_processes=num,
                               process_id=pid)
    logging.info('Process %d of %d joined %s.', jax.process_index(), jax.process_count(),
                 parallel_config.coordinator_address)


def set_deterministic_gpu_flags() -> None:
    """Adds the deterministic-ops XLA flags; must run before JAX starts its backends."""
    flags = os.environ.get('XLA_FLAGS', '').split()
    os.environ['XLA_FLAGS'] = ' '.join(flags + [f for f in DETERMINISTIC_GPU_FLAGS if f not in flags])


def sync(name: str) -> None:
    """Waits for every process (a no-op with one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
