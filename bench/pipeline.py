"""Input pipeline examples/s (JPEG decode + resize to 224 + tokenise) against the train step's consumption.

    python bench/pipeline.py
    python bench/pipeline.py --images 256 --threads 2

Writes `--images` synthetic COCO-sized JPEGs (640x480, quality 90, photo-like:
smooth gradients, shapes and sensor noise, ~150 KB each as COCO's average) and one caption per
image, builds a 5,000-word `jaxcap.data.text.Vocabulary`, then measures examples/s
of `jaxcap.data.images.load_image(.., 224)` (decoded at half scale, then
resized) -> `Vocabulary.encode(.., 35)`, batched by 64, in a grain pipeline with `--threads`
reader threads (as `jaxcap.data.pipeline` runs it), and on one thread. Then it times
the train step at the reference's shapes (`bench/train_step.py`'s step) in the same
run: `ratio_vs_baseline` is the pipeline's examples/s over the step's
consumption (64 examples per step). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import common

WORDS = ('a man woman dog cat person people group table street car bus train plate food pizza '
         'sitting standing on in of with the next to near large small white black red blue green '
         'young old two three holding riding walking playing field grass water beach building '
         'kitchen room bed window sign road tree sky clock bird horse giraffe elephant').split()


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--images', type=int, default=192, help='distinct JPEG files written')
    parser.add_argument('--examples', type=int, default=640, help='examples read per measurement')
    parser.add_argument('--threads', type=int, default=2, help='grain reader threads')
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=common.BATCH)
    parser.add_argument('--train-steps', type=int, default=5, help='timed train steps (0: skip)')
    parser.add_argument('--dir', default='', help='where to write the JPEGs (default: a temp dir)')
    return parser.parse_args()


def write_jpegs(directory: str, count: int, seed: int = 0) -> list[dict]:
    """COCO-sized photo-like JPEGs and a random caption each: [{'path', 'caption'}]."""
    import numpy as np
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:480, 0:640].astype(np.float32)
    records = []
    for i in range(count):
        angle, colors = rng.uniform(0, np.pi), rng.uniform(0, 255, (2, 3))
        t = (np.cos(angle) * x + np.sin(angle) * y) / 800.0
        pixels = (1 - t)[..., None] * colors[0] + t[..., None] * colors[1]
        pixels += rng.normal(0, 26, pixels.shape)  # sensor noise: what makes photos big
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = rng.integers(0, 560), rng.integers(0, 400)
            draw.ellipse([x0, y0, x0 + rng.integers(20, 200), y0 + rng.integers(20, 200)],
                         fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        path = os.path.join(directory, f'{i:06d}.jpg')
        image.save(path, quality=90)
        caption = ' '.join(rng.choice(WORDS, size=rng.integers(8, 16)))
        records.append({'path': path, 'caption': caption.capitalize() + '.'})
    return records


class _ToExample:
    """Path + caption -> {'images': 224x224x3 uint8, 'tokens', 'mask'}: what a train batch holds."""

    def __init__(self, vocab, size: int, max_len: int):
        self.vocab, self.size, self.max_len = vocab, size, max_len

    def __call__(self, record: dict) -> dict:
        import numpy as np

        from jaxcap.data import images, text
        tokens = self.vocab.encode(record['caption'], self.max_len)
        return {'images': images.load_image(record['path'], self.size),
                'tokens': tokens, 'mask': (tokens != text.PAD).astype(np.float32)}


def examples_per_s(records, to_example, batch: int, examples: int, threads: int) -> float:
    """Examples/s of a grain pipeline over `records` (repeated), `threads` reader threads."""
    import grain
    dataset = (grain.MapDataset.source(records).repeat(None).map(to_example)
               .batch(batch, drop_remainder=True)
               .to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)))
    iterator = iter(dataset)
    next(iterator)  # thread start-up and the first batch are not throughput
    batches = max(1, examples // batch)
    start = time.perf_counter()
    for _ in range(batches):
        out = next(iterator)
    elapsed = time.perf_counter() - start
    iterator.close()  # its reader threads would otherwise run on into the train step's timing
    assert out['images'].shape == (batch, to_example.size, to_example.size, 3)
    return batches * batch / elapsed


def train_step_ms(steps: int) -> float:
    """Median ms of the reference-shaped train step (bench/train_step.py's)."""
    import train_step as train_bench
    step, state, batch, _ = train_bench.build(common.BATCH, 'float32')
    runner = train_bench.Runner(step, state, batch)
    common.time_calls(runner, 2)  # compile and warm up
    return statistics.median(common.time_calls(runner, steps)) * 1e3


def main():
    args = parse_args()
    from jaxcap.data import text
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.dir or tmp
        os.makedirs(directory, exist_ok=True)
        start = time.perf_counter()
        records = write_jpegs(directory, args.images)
        common.log(f'wrote {len(records)} JPEGs in {time.perf_counter() - start:.1f} s')
        mean_kb = statistics.mean(os.path.getsize(r['path']) for r in records) / 1024
        vocab = text.Vocabulary.build((r['caption'] for r in records), 5000)
        to_example = _ToExample(vocab, args.size, common.MAX_LEN)
        rates = {}
        for threads in sorted({1, args.threads}):
            rates[threads] = examples_per_s(records, to_example, args.batch, args.examples, threads)
            common.log(f'{threads} thread(s): {rates[threads]:.1f} examples/s')
    result = {
        'bench': 'pipeline', 'image': '640x480 JPEG q90', 'mean_jpeg_kb': round(mean_kb, 1),
        'output_size': args.size, 'max_len': common.MAX_LEN, 'batch': args.batch,
        'examples_timed': max(1, args.examples // args.batch) * args.batch,
        'examples_per_s': round(rates[args.threads], 1), 'threads': args.threads,
        'examples_per_s_one_thread': round(rates[1], 1),
    }
    if args.train_steps:
        step_ms = train_step_ms(args.train_steps)
        consumption = args.batch / (step_ms / 1e3)
        result.update({'train_step_ms_median': round(step_ms, 1),
                       'train_step_consumption_examples_per_s': round(consumption, 1),
                       'ratio_vs_baseline': round(rates[args.threads] / consumption, 2)})
    common.emit(result)


if __name__ == '__main__':
    common.reexec_with_huge_pages()
    main()
