"""Evaluation: decode a split on device, score it with the official metrics, write the results."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxcap import decode, metrics, visualize
from jaxcap import workdir as workdir_lib
from jaxcap.data import pipeline, text


class Evaluator:
    """Decodes padded batches with one compiled function and scores the captions.

    The decoder is jitted once at construction; every batch has the same shape,
    so a whole split compiles exactly once.
    """

    def __init__(self, model, vocab: text.Vocabulary, config):
        self.model, self.vocab, self.config = model, vocab, config
        self.decode = decode.make_decoder(
            model, config.model.max_decode_len, config.model.beam_size,
            length_penalty=config.model.length_penalty, alpha=config.model.length_penalty_alpha,
            block_repeated_trigrams=config.model.block_repeated_trigrams)

    def caption_batches(self, variables, batches, keep_images: int | None = None) -> list[dict[str, Any]]:
        """Captions (and attention) for every valid row of every batch, in order.

        Only the first `keep_images` results (default: all) keep their image, for
        heatmaps; a large split would otherwise hold every image in memory.
        """
        results = []
        for batch in batches:
            out = self.decode(variables, batch['images'])
            tokens, alphas, log_probs = (np.asarray(x) for x in out)
            for row in np.flatnonzero(batch['valid']):
                length = _caption_length(tokens[row])
                results.append({
                    'image_id': batch['image_ids'][row],
                    'caption': self.vocab.decode(tokens[row]),
                    # One word per attention row, <end> included when it was generated.
                    'words': [self.vocab.itos[t] for t in tokens[row, :length]],
                    'score': float(log_probs[row]),
                    'alpha': alphas[row, :length],
                    'image': batch['images'][row] if keep_images is None or len(results) < keep_images
                    else None,
                    'references': batch['references'][row] if 'references' in batch else None,
                })
        return results

    def evaluate(self, variables, source, split: str, out_dir: str) -> dict[str, float]:
        """Decodes `split`, writes `<split>_metrics.json`, `<split>_captions.json` and heatmaps."""
        cfg = self.config
        batches = pipeline.eval_batches(source, cfg.eval.batch_size, cfg.data.image_size,
                                        cfg.eval.num_examples)
        results = self.caption_batches(variables, batches, keep_images=cfg.eval.num_heatmaps)
        log_samples(results)
        scores = metrics.score_captions({r['image_id']: r['references'] for r in results},
                                        {r['image_id']: r['caption'] for r in results})
        os.makedirs(out_dir, exist_ok=True)
        workdir_lib.write_json(os.path.join(out_dir, f'{split}_metrics.json'), scores)
        workdir_lib.write_json(os.path.join(out_dir, f'{split}_captions.json'),
                    [{'image_id': r['image_id'], 'caption': r['caption']} for r in results])
        for r in results[: cfg.eval.num_heatmaps]:
            self.save_heatmap(r, os.path.join(out_dir, 'heatmaps', f'{split}_{r["image_id"]}.png'))
        return scores

    def save_heatmap(self, result: dict[str, Any], path: str) -> str:
        return visualize.plot_attention(result['image'], result['words'], result['alpha'],
                                        square_grid(result['alpha'].shape[-1]), path,
                                        title=result['caption'])


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


def format_table(scores: dict[str, float], title: str) -> str:
    """A two-column summary table for stdout."""
    width = max(len(k) for k in scores)
    lines = [title, '-' * (width + 10)]
    lines += [f'{k:<{width}}  {v:7.4f}' for k, v in scores.items()]
    return '\n'.join(lines)


def log_samples(results: Sequence[dict[str, Any]], n: int = 3) -> None:
    for r in results[:n]:
        logging.info('image %s: %s | ref: %s', r['image_id'], r['caption'], (r['references'] or [''])[0])



def evaluate_split(config, model, vocab: text.Vocabulary, variables, workdir: str,
                   split: str | None = None, writer=None, step: int = 0) -> dict[str, float]:
    """Evaluates `split` (default `config.eval.split`) into `workdir/eval/` and prints the table."""
    import jax

    split = split or config.eval.split
    source = pipeline.load_source(config.data, split)
    scores = Evaluator(model, vocab, config).evaluate(variables, source, split,
                                                      os.path.join(workdir, 'eval'))
    if writer is not None:
        writer.write_scalars(step, {f'{split}/{k}': v for k, v in scores.items()})
    if jax.process_index() == 0:
        method = 'greedy' if config.model.beam_size == 1 else f'beam {config.model.beam_size}'
        print(format_table(scores, f'{split} metrics ({len(source)} images, {method} decoding)'),
              flush=True)
    return scores
