"""Orbax checkpoints holding the train state and the data iterator's position together.

Saving both in one checkpoint step is what makes a resumed run equal to an
uninterrupted one: the model continues from step N and the input pipeline
continues from batch N, not from a fresh shuffle.

What survives what:
- A save killed part-way leaves `<step>.orbax-checkpoint-tmp`. Orbax never lists
  it as a step (a step directory only appears by an atomic rename once every file
  is written) and the next save of that step replaces it, so it is ignored here.
  It is not deleted on start-up either: an evaluator may open a directory that a
  live run is writing into.
- A damaged step (a truncated or missing file: orbax raises on restore) is found
  when restoring the latest step: the newest step that restores is used, with a
  warning naming both. The damaged step is moved to `<dir>/corrupt-<step>`, never
  deleted: nothing saved is lost, the files stay for inspection, and the resumed
  run can save that step number again (orbax refuses to overwrite a step).
- Retention: the newest `max_to_keep` steps, plus, with `keep_best`, the step with
  the best metric. Orbax stores each step's metrics inside the step
  (`<step>/metrics`), so they survive restarts.
- Multi-host: every process calls `save` and `restore` (orbax writes
  cooperatively: each process its own shards, process 0 the metadata). The
  processes agree on the step they resume from, and only process 0 moves damaged
  steps aside, between barriers. (If only one process's files of a step are
  damaged, the others wait at orbax's restore barrier until it times out, 5 min,
  then all fall back together.)
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

CORRUPT_PREFIX = 'corrupt-'
# Orbax's per-step metrics: a JSON file, `<step>/metrics/metrics` (CheckpointManager's
# reserved `metrics` item). A damaged one makes CheckpointManager's constructor raise.
_METRICS_FILE = os.path.join(ocp.checkpoint_manager.METRIC_ITEM_NAME,
                             ocp.checkpoint_manager.METRIC_ITEM_NAME)
_barrier_ids = itertools.count()


class Checkpointer:
    """Saves every `every_steps` steps; keeps the newest `max_to_keep`, and the best if asked.

    Args:
        directory: where the step directories go (created if missing).
        every_steps: the training loop saves when `step % every_steps == 0`.
        max_to_keep: how many of the newest steps to keep.
        keep_best: also keep the step whose saved metrics have the best `best_metric`.
        best_metric: the metric `save(..., metrics=...)` ranks steps by.
        best_mode: 'max' if higher is better, 'min' if lower is.
    """

    def __init__(self, directory: str, every_steps: int, max_to_keep: int, *,
                 keep_best: bool = False, best_metric: str = 'CIDEr', best_mode: str = 'max'):
        if every_steps <= 0:
            raise ValueError(f'ckpt.every_steps must be positive, got {every_steps}.')
        if max_to_keep is None or max_to_keep <= 0:
            raise ValueError(f'ckpt.max_to_keep must be positive, got {max_to_keep}.')
        if best_mode not in ('max', 'min'):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}.")
        self.every_steps = every_steps
        self.directory = os.path.abspath(directory)
        self.best_metric, self.best_mode = best_metric, best_mode
        check_directory(self.directory)
        # Damaged steps found before a restore: (step, moved_to, reason), reported by restore.
        self._set_aside: list[tuple[int, str, str]] = []
        self._set_aside_unreadable_metrics()
        self.manager = ocp.CheckpointManager(
            self.directory, options=_manager_options(max_to_keep, keep_best, best_metric, best_mode))
        # Each step's metrics, kept here too: orbax's file appears only once an async save is done.
        self._metrics = {step: self.manager.metrics(step) for step in self.manager.all_steps()}

    def latest_step(self) -> int | None:
        """The newest saved step (possibly damaged: `restore` finds out), or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def best_step(self) -> int | None:
        """The kept step with the best `best_metric` (the newest of equals), or None if none has it."""
        scored = [(value, step) for step in self.manager.all_steps()
                  if (value := _metric_value(self._metrics.get(step), self.best_metric)) is not None]
        if not scored:
            return None
        sign = 1.0 if self.best_mode == 'max' else -1.0
        return max(scored, key=lambda value_step: (sign * value_step[0], value_step[1]))[1]

    def metrics(self, step: int) -> dict[str, float]:
        """The metrics saved with `step` ({} if none)."""
        return dict(self._metrics.get(step) or {})

    def restore(self, state: Any, data_iterator: Any | None = None, step: int | None = None) -> Any:
        """Returns the state saved at `step`; restores the data iterator in place.

        With `step=None`, the newest step that restores: a damaged newer one is moved
        aside with a warning. An explicit `step` is restored or fails, never replaced.
        """
        if step is None:
            return self._restore_newest_good(state, data_iterator)
        if step not in self.manager.all_steps():
            raise FileNotFoundError(f'No checkpoint at step {step} in {self.directory}; saved '
                                    f'steps: {self.all_steps()}.')
        try:
            return self._restore_step(step, state, data_iterator)
        except Exception as e:  # noqa: BLE001 - orbax raises many types; see _restore_error
            raise _restore_error(self.directory, [(step, e)]) from e

    def save(self, step: int, state: Any, data_iterator: Any | None,
             metrics: dict[str, float] | None = None) -> bool:
        """Saves `step` unless it is already saved (a resumed run's first step); True if it saved.

        `metrics` (e.g. {'CIDEr': 1.2}) are stored with the step and rank it for `keep_best`.
        Every process must call this (orbax synchronises the hosts).
        """
        if step in self.manager.all_steps():
            return False
        items = {'state': ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
        # Always a dict, even empty: with metrics=None orbax warns on every save.
        values = {k: float(v) for k, v in (metrics or {}).items()}
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=values, force=True)
        self._metrics[step] = values
        logging.info('Saved checkpoint at step %d.', step)
        return True

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def _restore_newest_good(self, state: Any, data_iterator: Any | None) -> Any:
        candidates = sorted(self.manager.all_steps(), reverse=True)
        if not candidates:
            raise FileNotFoundError(f'No checkpoint in {self.directory}.')
        failures = []
        for candidate in candidates:
            try:
                restored, error = self._restore_step(candidate, state, data_iterator), None
            except Exception as e:  # noqa: BLE001 - a truncated file raises a bare Exception
                restored, error = None, e
            # All processes must resume from the same step, even if only one's files are damaged.
            if _all_processes_ok(candidate, error is None):
                self._report_fallback(failures, candidate)
                return restored
            failures.append((candidate, error or RuntimeError('damaged on another process')))
        # Nothing restores: the model changed, or every step is damaged. Move nothing.
        raise _restore_error(self.directory, failures) from failures[0][1]

    def _restore_step(self, step: int, state: Any, data_iterator: Any | None) -> Any:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        items = {'state': ocp.args.StandardRestore(abstract)}
        if data_iterator is not None:
            items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**items))['state']

    def _report_fallback(self, failures: list[tuple[int, Exception]], used: int) -> None:
        """Moves the steps that failed aside and warns, naming them and the step used."""
        for step, error in failures:
            moved_to = self._move_aside(step)
            logging.warning(
                'Checkpoint step %d (%s) could not be restored (%s); restored step %d instead. %s',
                step, os.path.join(self.directory, str(step)), _short(error), used,
                f'The damaged step was moved to {moved_to} (kept, not deleted).' if moved_to else
                'It no longer exists (deleted by the run that made it?).')
        for step, moved_to, reason in self._set_aside:
            logging.warning('Checkpoint step %d was damaged (%s) and moved to %s; restored step %d '
                            'instead.', step, reason, moved_to, used)
        self._set_aside.clear()
        if failures:
            self.manager.reload()

    def _set_aside_unreadable_metrics(self) -> None:
        """Moves aside steps with an unreadable metrics file, on which orbax's constructor raises."""
        if not os.path.isdir(self.directory):
            return
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name, _METRICS_FILE)
            if not (name.isdigit() and os.path.isfile(path)):
                continue
            try:
                with open(path) as f:
                    json.load(f)
            except (OSError, ValueError) as e:
                moved_to = self._move_aside(int(name))
                if moved_to is None:
                    continue
                reason = f'unreadable {path}: {_short(e)}'
                logging.warning('Checkpoint step %s is damaged (%s); moved it to %s (kept, not '
                                'deleted).', name, reason, moved_to)
                self._set_aside.append((int(name), moved_to, reason))

    def _move_aside(self, step: int) -> str | None:
        """Renames step `step` to a free `corrupt-<step>[.n]` (on process 0); None if it is gone."""
        source = os.path.join(self.directory, str(step))
        if not os.path.exists(source):  # e.g. a live run's retention deleted it as we read it
            return None
        target = os.path.join(self.directory, f'{CORRUPT_PREFIX}{step}')
        for n in itertools.count(1):
            if not os.path.exists(target):
                break
            target = os.path.join(self.directory, f'{CORRUPT_PREFIX}{step}.{n}')
        _barrier(f'jaxcap_ckpt_move_aside_{step}')  # every process has listed the directory
        if jax.process_index() == 0:
            try:
                os.rename(source, target)
            except OSError as e:
                logging.warning('Could not move damaged checkpoint %s to %s (%s): move it away '
                                'before the run saves step %d again.', source, target, e, step)
        _barrier(f'jaxcap_ckpt_moved_aside_{step}')
        return target


def check_directory(path: str) -> None:
    """Fails, naming the path and the fix, if checkpoints cannot be read and written at `path`."""
    existing = os.path.abspath(path)  # a relative path's dirname ends at '', which never exists
    while not os.path.exists(existing):  # orbax creates the missing part in the nearest ancestor
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(
            f'{existing} is a file, but checkpoints need a directory at {path}. Move the file '
            'away, or choose another --workdir.')
    if not os.access(existing, os.R_OK | os.W_OK | os.X_OK):
        raise PermissionError(
            f'Permission denied: checkpoints at {path} need read and write access to {existing}. '
            f'Fix its permissions (e.g. `chmod u+rwx {existing}`), or choose another --workdir.')


def _manager_options(max_to_keep: int, keep_best: bool, best_metric: str,
                     best_mode: str) -> ocp.CheckpointManagerOptions:
    """The newest `max_to_keep` steps, plus the best one if `keep_best`.

    Orbax's own `max_to_keep` with `best_fn` would keep only the best N, dropping
    the newest steps a resume needs; hence the explicit union of two policies.
    `best_fn` stays set either way: it is what makes orbax store the metrics.
    """
    score = functools.partial(_score, metric=best_metric, missing=-math.inf if best_mode == 'max'
                              else math.inf)
    policies = [checkpoint_managers.LatestN(n=max_to_keep)]
    if keep_best:
        policies.append(checkpoint_managers.BestN(
            get_metric_fn=score, reverse=best_mode == 'min', n=1,
            keep_checkpoints_without_metrics=False))
    return ocp.CheckpointManagerOptions(
        create=True, best_fn=score, best_mode=best_mode,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies))


def _metric_value(metrics: dict | None, metric: str) -> float | None:
    value = (metrics or {}).get(metric)
    return float(value) if value is not None and math.isfinite(value) else None


def _score(metrics: dict | None, *, metric: str, missing: float) -> float:
    """A step's rank; steps without the metric (or with NaN) rank worst."""
    value = _metric_value(metrics, metric)
    return missing if value is None else value


def _all_processes_ok(step: int, ok: bool) -> bool:
    """Whether every process restored `step` (trivially `ok` on one process)."""
    if jax.process_count() == 1:
        return ok
    gathered = multihost_utils.process_allgather(np.asarray([step, ok], np.int32))
    if not (gathered[:, 0] == step).all():  # a bug, not damage: never resume from mixed steps
        raise RuntimeError(f'Processes tried to restore different steps: {gathered[:, 0]}.')
    return bool(gathered[:, 1].all())


def _barrier(name: str) -> None:
    # Barrier names must be unique per process lifetime.
    ocp.multihost.sync_global_processes(f'{name}_{next(_barrier_ids)}')


def _short(error: BaseException) -> str:
    """The first line of an error (tensorstore appends a long spec dump), at most 300 chars."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ''
    return f'{type(error).__name__}: {text[:300]}'


def _restore_error(directory: str, failures: list[tuple[int, Exception]]) -> ValueError:
    tried = '; '.join(f'step {step}: {_short(e)}' for step, e in failures)
    return ValueError(
        f'Could not restore a checkpoint from {directory} ({tried}). If the model config changed, '
        'use a new --workdir or the config the checkpoints were made with; if the files are '
        'damaged, move the step directories away (nothing is deleted automatically).')
