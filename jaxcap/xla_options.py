"""Per-function XLA compiler options: what the decoders and the feature extractor compile with on CPU.

jax 0.10's XLA:CPU hands matmuls, convolutions, and reductions together with the
elementwise ops that feed them, to the YNNPACK library. Two of those choices
are slow here, and `CPU_OPTIONS` keeps YNNPACK for the matmuls alone:

- The attention's score, sum_a V_a tanh(keys + query)_a over every region, is
  such a reduction. YNNPACK runs it about half as fast as XLA's own fused loop
  (1.4-1.9 against 0.75-1.0 ms for a batch-64 step, measured alone). Beam
  search, with three times the rows, spent a sixth of each step there: 1.69 s
  a batch with the default, 1.31 s without (BENCHMARKS.md, round 3).
- ResNet-50's 3x3 and 7x7 convolutions run faster in XLA's own (Eigen) kernels
  than in YNNPACK's: 9.0 against 11.0-11.3 images/s at batch 32, alternated in
  one process, and 0.90x against 0.96-1.06x Keras' images/s in `bench/encoder.py`
  (BENCHMARKS.md, round 4). Its 1x1 convolutions are matmuls on CPU
  (`jaxcap.models.resnet`), so they stay in YNNPACK.

The options go to `jax.jit(..., compiler_options=...)` of the functions that
gain from them (`jit`), not through the process-wide XLA_FLAGS: a user's own
flags and jits are left alone, and an XLA that no longer knows the option only
loses the speed-up (`cpu_options` checks once and then returns None). jax
accepts compiler options on top-level jits only, so a decoder called inside a
user's own jit (or grad) runs as a plain jitted function there, with the outer
options. The train step keeps XLA's defaults: these options did not speed it up.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import jax
import numpy as np

# YNNPACK for matmuls only; XLA fuses the rest itself and runs the convolutions.
CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}


@functools.cache
def cpu_options() -> dict[str, str] | None:
    """`CPU_OPTIONS` on a CPU backend whose XLA accepts them; else None (XLA's defaults)."""
    if jax.default_backend() != 'cpu':
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(np.float32(0)).compile()
    except Exception as error:  # noqa: BLE001 -- XLA reports an unknown option as a runtime error
        logging.warning('XLA:CPU rejected the compiler options %s (%s); decoding and feature '
                        'extraction use its defaults, which are slower.', CPU_OPTIONS, error)
        return None
    return dict(CPU_OPTIONS)


class jit:  # noqa: N801 -- used like jax.jit
    """`jax.jit(fun, **kwargs)` compiled with `cpu_options()` when called at the top level."""

    def __init__(self, fun: Callable[..., Any], **kwargs):
        self._with_options = jax.jit(fun, compiler_options=cpu_options(), **kwargs)
        self._nested = jax.jit(fun, **kwargs)

    def __call__(self, *args, **kwargs):
        traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs)))
        return (self._nested if traced else self._with_options)(*args, **kwargs)

    def __getattr__(self, name):
        # The rest of a jitted function's interface (lower, trace, _cache_size, ...).
        return getattr(self._with_options, name)
