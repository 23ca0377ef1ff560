"""The default job (`python launch.py`) timed to completion, with its metrics against the stated ones.

    python bench/default_job.py                        # a fresh workdir in /tmp, ~10 min on 2 cores
    python bench/default_job.py --workdir=/tmp/job -- --config.train.num_steps=500

Runs `launch.py` (default config `configs/shapes.py`) in a fresh workdir, so
nothing is resumed, and reads the scores it wrote (`eval/val_metrics.json`). The
stated scores are the ones the config's docstring gives for this CPU, or its
first ones; `ratio_vs_baseline` is
absent (the reference never ran this job). Arguments after `--` go to launch.py.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import common

METRICS = ('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr')


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--workdir', default='', help='must not hold checkpoints (default: a temp dir)')
    parser.add_argument('--config', default=os.path.join(common.REPO, 'configs', 'shapes.py'))
    parser.add_argument('--timeout', type=int, default=3 * 3600)
    parser.add_argument('launch_args', nargs='*', help='extra launch.py flags (after --)')
    return parser.parse_args()


def stated_metrics(config_path: str, family_model: str = '') -> dict[str, float]:
    """The greedy column of the scores a config's docstring states for this CPU (`Bleu_1 0.8321 ...`).

    XLA:CPU's digits depend on the CPU, so the docstring may hold a table per CPU:
    the first table after the CPU's name ("family 25 model 17", from
    `family_model` "25/17"), else the first table.
    """
    with open(config_path) as f:
        source = f.read()
    docstring = source.split('"""')[1] if '"""' in source else ''
    if '/' in family_model:
        family, model = family_model.split('/')
        named = re.search(rf'family {family} model {model}\b', docstring)
        docstring = docstring[named.end():] if named else docstring
    stated: dict[str, float] = {}
    for name, value in re.findall(r'\b(' + '|'.join(METRICS) + r')\s+([0-9.]+)', docstring):
        stated.setdefault(name, float(value))
    return stated


def last_training_log(stderr: str) -> dict[str, float]:
    """The last `step N: loss=..., examples_per_s=...` line the job logged."""
    lines = re.findall(r'step (\d+): (.*)', stderr)
    if not lines:
        return {}
    step, fields = lines[-1]
    values = dict(re.findall(r'(\w+)=([-0-9.e+]+)', fields))
    return {'step': int(step), **{k: float(v) for k, v in values.items()}}


def main():
    args = parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix='jaxcap_default_job_')
    if os.path.isdir(os.path.join(workdir, 'checkpoints')):
        sys.exit(f'{workdir} holds checkpoints: the job would resume. Pass a fresh --workdir.')
    command = [sys.executable, os.path.join(common.REPO, 'launch.py'), f'--config={args.config}',
               f'--workdir={workdir}', *args.launch_args]
    common.log('running:', ' '.join(command))
    start = time.perf_counter()
    done = subprocess.run(command, cwd=common.REPO, capture_output=True, text=True,
                          timeout=args.timeout, check=False)
    wall_s = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f'launch.py failed ({done.returncode}):\n{done.stderr[-3000:]}')
    with open(os.path.join(workdir, 'eval', 'val_metrics.json')) as f:
        scores = json.load(f)
    # {'greedy': {...}, 'beam3': {...}} (one entry per eval width), or flat scores.
    measured = scores.get('greedy', scores)
    stated = stated_metrics(args.config, common.cpu_identity()['cpu_family_model'])
    result = {
        'bench': 'default_job', 'command': ' '.join(command[1:]), 'workdir': workdir,
        'wall_s': round(wall_s, 1), 'wall_min': round(wall_s / 60, 2),
        'metrics': {k: round(float(measured[k]), 4) for k in METRICS if k in measured},
        'other_decodings': {name: {k: round(float(v[k]), 4) for k in METRICS if k in v}
                            for name, v in scores.items() if isinstance(v, dict) and name != 'greedy'},
        'stated_metrics': stated,
        'metric_minus_stated': {k: round(float(measured[k]) - v, 4) + 0.0 for k, v in stated.items()
                                if k in measured},
        'last_training_log': last_training_log(done.stderr),
        'job_peak_rss_mb': common.children_peak_rss_mb(),
    }
    common.emit(result)


if __name__ == '__main__':
    common.reexec_with_huge_pages()
    main()
