"""Data parallelism: one mesh axis over every device; batches split, state replicated.

`jax.jit` with these shardings partitions the step across devices (each device
computes its slice of the batch; gradients are all-reduced by the compiler).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
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
    """Puts a host batch on the devices, split along the batch axis."""
    return jax.device_put(batch, batch_sharding(mesh))


def replicate(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, replicated(mesh))
