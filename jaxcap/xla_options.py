"""Per-function XLA compiler options: what the decoders compile with on CPU.

jax 0.10's XLA:CPU hands matmuls and convolutions to the YNNPACK library, and by
default also reductions together with the elementwise ops that feed them. The
attention's score, sum_a V_a tanh(keys + query)_a over every region, is such a
reduction, and YNNPACK runs it about half as fast as XLA's own fused loop (1.4-1.9
against 0.75-1.0 ms for a batch-64 step, measured alone). Beam search, with three
times the rows, spent a sixth of each step there: 1.69 s a batch with the
default, 1.31 s with YNNPACK limited to dots and convolutions (BENCHMARKS.md).

The options go to `jax.jit(..., compiler_options=...)` of the functions that
gain from them, not through the process-wide XLA_FLAGS: a user's own flags and
jits are left alone, and an XLA that no longer knows the option only loses the
speed-up (`decoder_options` checks once and then returns None). jax accepts
compiler options on top-level jits only, so a decoder called inside a user's own
jit (or grad) runs as a plain jitted function there, with the outer options.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import jax
import numpy as np

# YNNPACK for dots and convolutions only; XLA fuses the rest itself.
CPU_DECODER_OPTIONS = {
    'xla_cpu_experimental_ynn_fusion_type':
        'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION',
}


@functools.cache
def decoder_options() -> dict[str, str] | None:
    """`CPU_DECODER_OPTIONS` on a CPU backend whose XLA accepts them; else None (XLA's defaults)."""
    if jax.default_backend() != 'cpu':
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_DECODER_OPTIONS).lower(np.float32(0)).compile()
    except Exception as error:  # noqa: BLE001 -- XLA reports an unknown option as a runtime error
        logging.warning('XLA:CPU rejected the decoder compiler options (%s); decoding uses its '
                        'defaults, which are slower for beam search.', error)
        return None
    return dict(CPU_DECODER_OPTIONS)


class jit_decoder:  # noqa: N801 -- used like jax.jit
    """`jax.jit(fun, **kwargs)` compiled with `decoder_options()` when called at the top level."""

    def __init__(self, fun: Callable[..., Any], **kwargs):
        self._with_options = jax.jit(fun, compiler_options=decoder_options(), **kwargs)
        self._nested = jax.jit(fun, **kwargs)

    def __call__(self, *args, **kwargs):
        traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs)))
        return (self._nested if traced else self._with_options)(*args, **kwargs)

    def __getattr__(self, name):
        # The rest of a jitted function's interface (lower, trace, _cache_size, ...).
        return getattr(self._with_options, name)
