"""Orbax checkpoints holding the train state and the data iterator's position together.

Saving both in one checkpoint step is what makes a resumed run equal to an
uninterrupted one: the model continues from step N and the input pipeline
continues from batch N, not from a fresh shuffle.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Keeps the newest `max_to_keep` checkpoints; the loop saves every `every_steps` steps."""

    def __init__(self, directory: str, every_steps: int, max_to_keep: int):
        if every_steps <= 0:
            raise ValueError(f'ckpt.every_steps must be positive, got {every_steps}.')
        self.every_steps = every_steps
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, state: Any, data_iterator: Any | None = None, step: int | None = None) -> Any:
        """Returns the state saved at `step` (default: latest); restores the iterator in place."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f'No checkpoint in {self.manager.directory}.')
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        items = {'state': ocp.args.StandardRestore(abstract)}
        if data_iterator is not None:
            items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except ValueError as e:  # a structure or shape mismatch: another model's checkpoint
            raise ValueError(
                f'The checkpoint at step {step} in {self.manager.directory} does not match this '
                f'model ({e}). Use a new --workdir, or the config the checkpoint was made with.') from e
        return restored['state']

    def save(self, step: int, state: Any, data_iterator: Any | None) -> bool:
        """Saves `step` unless it is already saved (a resumed run's first step); True if it saved."""
        if step in self.manager.all_steps():
            return False
        items = {'state': ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        logging.info('Saved checkpoint at step %d.', step)
        return True

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
