"""Evaluation: decode a split on device, score it with the official metrics, write the results.

A split is decoded once per beam width in `config.eval.beam_sizes` (1 = greedy).
`eval/<split>_metrics.json` maps each decoding ('greedy', 'beam3', ...) to its
scores; `eval/<split>_captions.json` holds the first decoding's captions in the
COCO results format (`<split>_captions_beam3.json` and so on for the others).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxcap import decode, metrics, parallel, report, visualize
from jaxcap import workdir as workdir_lib
from jaxcap.data import pipeline, text


def decoding_name(beam_size: int) -> str:
    return 'greedy' if beam_size == 1 else f'beam{beam_size}'


class Evaluator:
    """Decodes padded batches with one compiled function per beam width.

    Every batch has the same shape, so a split compiles once, and the variables
    are prepared for decoding once per call (`decode.prepare`). Batches are split
    over this process's devices when the batch size divides their count (rows
    are independent, so the captions do not depend on the split).
    """

    def __init__(self, model, vocab: text.Vocabulary, config, beam_size: int | None = None):
        self.model, self.vocab, self.config = model, vocab, config
        self.beam_size = config.model.beam_size if beam_size is None else beam_size
        self.decode = decode.make_decoder(
            model, config.model.max_decode_len, self.beam_size,
            length_penalty=config.model.length_penalty, alpha=config.model.length_penalty_alpha,
            block_repeated_trigrams=config.model.block_repeated_trigrams)
        self.mesh = parallel.make_mesh(jax.local_devices())

    def _place(self, variables, inputs):
        """Variables replicated and inputs split over the local devices (or all on one)."""
        if inputs.shape[0] % self.mesh.size:
            device = jax.local_devices()[0]
            return jax.device_put(parallel.local_copy(variables), device), inputs
        variables = jax.device_put(parallel.local_copy(variables), NamedSharding(self.mesh, P()))
        return variables, jax.device_put(inputs, NamedSharding(self.mesh, P(parallel.DATA_AXIS)))

    def caption_batches(self, variables, batches: Iterable[dict[str, Any]],
                        keep_images: int | None = None) -> list[dict[str, Any]]:
        """Captions (and attention) for every valid row of every batch, in order.

        `variables`: the model's, or `decode.prepare`d ones (which callers that
        caption batch after batch with the same variables pass).

        Only the first `keep_images` results (default: all) keep their image, for
        heatmaps; a large split would otherwise hold every image in memory.
        """
        results, placed = [], None
        for batch in batches:
            inputs = model_inputs(batch)
            if placed is None:
                placed, _ = self._place(variables, inputs)
                if not isinstance(placed, decode.Prepared):
                    placed = decode.prepare(self.model, placed)
            _, inputs = self._place({}, inputs)
            tokens, alphas, log_probs = (np.asarray(x) for x in self.decode(placed, inputs))
            for row in np.flatnonzero(batch['valid']):
                length = _caption_length(tokens[row])
                keep = 'images' in batch and (keep_images is None or len(results) < keep_images)
                results.append({
                    'image_id': batch['image_ids'][row],
                    'caption': self.vocab.decode(tokens[row]),
                    # One word per attention row, <end> included when it was generated.
                    'words': [self.vocab.itos[t] for t in tokens[row, :length]],
                    'score': float(log_probs[row]),
                    'alpha': alphas[row, :length],
                    'image': batch['images'][row] if keep else None,
                    'references': batch['references'][row] if 'references' in batch else None,
                })
        return results

    def save_heatmap(self, result: dict[str, Any], path: str) -> str:
        return visualize.plot_attention(result['image'], result['words'], result['alpha'],
                                        square_grid(result['alpha'].shape[-1]), path,
                                        title=result['caption'])


def model_inputs(batch: dict[str, Any]):
    """A batch's images, or its cached encoder grids."""
    return batch['features'] if 'features' in batch else batch['images']


def evaluate(config, model, vocab: text.Vocabulary, variables, source, split: str,
             out_dir: str, beam_sizes: Sequence[int]) -> dict[str, dict[str, float]]:
    """Decodes `split` once per beam width, scores each, and writes the eval files."""
    cfg = config.eval
    os.makedirs(out_dir, exist_ok=True)
    all_scores, shown = {}, {}  # shown: image_id -> report entry, for the first images
    for i, beam_size in enumerate(beam_sizes):
        name = decoding_name(beam_size)
        batches = pipeline.eval_batches(source, cfg.batch_size, config.data.image_size,
                                        cfg.num_examples)
        evaluator = Evaluator(model, vocab, config, beam_size)
        results = evaluator.caption_batches(variables, batches, keep_images=cfg.num_heatmaps)
        log_samples(results)
        all_scores[name] = metrics.score_captions(
            {r['image_id']: r['references'] for r in results},
            {r['image_id']: r['caption'] for r in results})
        suffix = '' if i == 0 else f'_{name}'
        workdir_lib.write_json(os.path.join(out_dir, f'{split}_captions{suffix}.json'),
                               [{'image_id': r['image_id'], 'caption': r['caption']} for r in results])
        for r in results[: cfg.num_heatmaps]:
            entry = shown.setdefault(r['image_id'], {
                'image_id': r['image_id'], 'image': r['image'], 'references': r['references'],
                'captions': {}})
            entry['captions'][name] = r['caption']
            if r['image'] is not None:
                path = evaluator.save_heatmap(
                    r, os.path.join(out_dir, 'heatmaps', f'{split}_{r["image_id"]}_{name}.png'))
                entry.setdefault('heatmap', path)  # the report shows the first decoding's
    workdir_lib.write_json(os.path.join(out_dir, f'{split}_metrics.json'), all_scores)
    if cfg.report:
        report.write_report(os.path.join(out_dir, f'{split}_report.html'),
                            f'jaxcap: {split} split ({len(source)} images)', all_scores,
                            list(shown.values()))
    return all_scores


def square_grid(num_regions: int) -> tuple[int, int]:
    """The (h, w) of a square encoder grid with `num_regions` cells."""
    side = int(round(num_regions ** 0.5))
    if side * side != num_regions:
        raise ValueError(f'Attention over {num_regions} regions is not a square grid.')
    return side, side


def _caption_length(tokens: np.ndarray) -> int:
    """Generated tokens up to and including <end> (all of them if it never came)."""
    ends = np.flatnonzero(tokens == text.END)
    return int(ends[0]) + 1 if ends.size else len(tokens)


def format_table(scores: dict[str, dict[str, float]], title: str) -> str:
    """A summary table for stdout: one row per metric, one column per decoding."""
    names = list(scores)
    metric_names = list(next(iter(scores.values())))
    width = max(len(k) for k in metric_names)
    header = f'{"":<{width}}' + ''.join(f'  {n:>8}' for n in names)
    lines = [title, '-' * len(header), header]
    lines += [f'{k:<{width}}' + ''.join(f'  {scores[n][k]:8.4f}' for n in names) for k in metric_names]
    return '\n'.join(lines)


def log_samples(results: Sequence[dict[str, Any]], n: int = 3) -> None:
    for r in results[:n]:
        logging.info('image %s: %s | ref: %s', r['image_id'], r['caption'], (r['references'] or [''])[0])


def evaluate_split(config, model, vocab: text.Vocabulary, variables, workdir: str,
                   split: str | None = None, writer=None, step: int = 0,
                   beam_sizes: Sequence[int] | None = None) -> dict[str, dict[str, float]]:
    """Evaluates `split` (default `config.eval.split`) into `workdir/eval/` and prints the table."""
    split = split or config.eval.split
    beam_sizes = tuple(config.eval.beam_sizes if beam_sizes is None else beam_sizes)
    source = pipeline.evaluation_source(config, split)
    scores = evaluate(config, model, vocab, variables, source, split,
                      os.path.join(workdir, 'eval'), beam_sizes)
    if writer is not None:
        writer.write_scalars(step, {f'{split}/{name}/{k}': v
                                    for name, s in scores.items() for k, v in s.items()})
    if jax.process_index() == 0:
        print(format_table(scores, f'{split} metrics ({len(source)} images)'), flush=True)
    return scores


class Validator:
    """Training-time validation: greedy CIDEr-D on the first val images, in process.

    The batches and the references' document frequencies are prepared once; a
    call decodes, scores, logs the score and a few sample captions, and returns
    {'CIDEr': score} for the checkpointer to keep the best step.
    """

    def __init__(self, model, vocab: text.Vocabulary, config, writer, num_samples: int = 3):
        self.writer, self.num_samples = writer, num_samples
        self.evaluator = Evaluator(model, vocab, config, beam_size=1)
        source = pipeline.evaluation_source(config, config.eval.split)
        self.batches = list(pipeline.eval_batches(source, config.eval.batch_size,
                                                  config.data.image_size,
                                                  config.train.validate_examples))
        # Cleaned as the vocabulary cleans captions, the way the candidates come out.
        references = {i: [' '.join(text.clean_caption(c)) for c in refs]
                      for b in self.batches for i, refs in zip(b['image_ids'], b['references'])}
        self.cider = metrics.CiderD(references)

    def __call__(self, state, step: int) -> dict[str, float]:
        results = self.evaluator.caption_batches(state.variables(), self.batches, keep_images=0)
        score, _ = self.cider.score({r['image_id']: r['caption'] for r in results})
        score = float(score)
        self.writer.write_scalars(step, {'val/CIDEr-D': score})
        samples = [f'{r["image_id"]}: {r["caption"]}  (ref: {r["references"][0]})'
                   for r in results[:self.num_samples]]
        self.writer.write_texts(step, {'val/samples': '\n\n'.join(samples)})
        return {'CIDEr': score}
