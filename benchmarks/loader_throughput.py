"""Host loader throughput (examples/s) of the rec/res/mrefm train pipelines on RefShapes.

    python benchmarks/loader_throughput.py --data_dir /tmp/refshapes_data [--config tiny]
        [--tasks rec,res,mrefm] [--sizes 128,384] [--workers 0,2] [--batches 20]
        [--batch_size 32]

Builds the RefShapes config into ``--data_dir`` if absent. Each cell times ``--batches``
batches after one warm-up batch (worker start-up and tokenizer loading excluded).
"""

from __future__ import annotations

import argparse
import time

from absl import flags


def measure(
    data_dir: str, config: str, task: str, size: int, workers: int, batches: int, bs: int
) -> float:
    from refjax.data.pipeline import make_pipeline
    from refjax.tasks import get_task
    from refjax.train.config import apply_overrides, load_config

    spec = "mrefm.py:tiny" if task == "mrefm" else f"rec_res.py:tiny,task={task}"
    cfg = load_config(f"configs/oneref/{spec}")
    apply_overrides(cfg, [f"data.dataset_config={config}", f"data.data_dir={data_dir}",
                          f"model.img_size={size}", f"data.batch_size={bs}",
                          f"data.num_workers={workers}"])
    data_task = get_task(cfg.task).data_task(cfg)
    with make_pipeline(cfg.data, "train", task=data_task, train=True, seed=0, process_index=0,
                       process_count=1) as it:
        next(it)
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batches * bs / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--config", default="tiny")
    p.add_argument("--sizes", default="128,384")
    p.add_argument("--workers", default="0,2")
    p.add_argument("--tasks", default="rec,res")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=32)
    a = p.parse_args()
    flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags
    from refjax.data.build import ensure_refshapes

    ensure_refshapes(a.data_dir, a.config)
    print(f"RefShapes/{a.config} train, batch {a.batch_size}, {a.batches} batches per cell")
    print(f"{'task':<6}{'size':>6}{'workers':>9}{'examples/s':>13}")
    for task in a.tasks.split(","):
        for size in (int(s) for s in a.sizes.split(",")):
            for w in (int(x) for x in a.workers.split(",")):
                r = measure(a.data_dir, a.config, task, size, w, a.batches, a.batch_size)
                print(f"{task:<6}{size:>6}{w:>9}{r:>13.1f}", flush=True)


if __name__ == "__main__":
    main()
