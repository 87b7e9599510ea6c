"""Where a train example's host time goes: milliseconds per used example in each pipeline stage.

    python benchmarks/pipeline_stages.py --data_dir DATA [--config default] [--task res]
        [--size 128] [--examples 600]

Runs the train stages of ``make_pipeline`` (expand, augment, tokenize, the task's extra stages,
finalize) one after another in this process on ``--examples`` random expressions of the train
split, timing each. An expression the task does not use stops after ``expand`` and its time is
charged to the used ones. The tokenizer is loaded before timing.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--config", default="default")
    p.add_argument("--task", default="res", choices=("rec", "res", "mrefm"))
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--examples", type=int, default=600)
    a = p.parse_args()
    from refjax.data import stages as st
    from refjax.data.build import ensure_refshapes
    from refjax.data.sources import open_split
    from refjax.tasks import get_task
    from refjax.train.config import apply_overrides, load_config

    ensure_refshapes(a.data_dir, a.config)
    spec = "mrefm.py:tiny" if a.task == "mrefm" else f"rec_res.py:tiny,task={a.task}"
    cfg = load_config(f"configs/oneref/{spec}")
    apply_overrides(cfg, [f"data.data_dir={a.data_dir}", f"data.dataset_config={a.config}",
                          f"model.img_size={a.size}"])
    task = get_task(cfg.task).data_task(cfg)
    src = open_split(cfg.data, "train")
    tok = src.file(task.tokenizer_file)
    d = cfg.data
    named = [("expand", st.Expand(src, False, task)),
             ("augment", st.Augment(task.size, False, task.num_scales, tuple(d.image_mean),
                                    tuple(d.image_std))),
             ("tokenize", st.Tokenize(tok, bool(d.truncate_text), False, task))]
    named += [(type(s).__name__, s) for s in task.extra_stages(True, tok)]
    named.append(("finalize", st.Finalize(task, keep_bad=True)))
    named[2][1].tokenizer  # noqa: B018  (load it outside the timing)
    pairs = src.expression_index()
    picks = np.random.default_rng(0).permutation(len(pairs))[: a.examples]
    spent = dict.fromkeys((n for n, _ in named), 0.0)
    used = 0
    for j in picks:
        x = np.array([j, *pairs[j]])
        for name, stage in named:
            t = time.perf_counter()
            if hasattr(stage, "random_map"):
                x = stage.random_map(x, np.random.default_rng(int(j)))
            else:
                x = stage.map(x)
            spent[name] += time.perf_counter() - t
            if st.is_sentinel(x):
                break
        else:
            used += 1
    print(f"{a.task} {a.size} px, RefShapes/{a.config} train: {used} of {len(picks)} sampled "
          f"expressions used; {len(picks) / used:.2f} read per used example")
    for name, s in spent.items():
        print(f"  {name:<12}{s / used * 1e3:7.2f} ms per used example")
    print(f"  {'total':<12}{sum(spent.values()) / used * 1e3:7.2f} ms "
          f"({used / sum(spent.values()):.0f} examples/s on one core)")


if __name__ == "__main__":
    main()
