"""Learning curve of the demo model against examples seen, without the data loader in the way.

    python experiments/oneref_demo/learning_curve.py --data_dir runs/demo/data \
        --cache /tmp/refshapes_cache --steps 4000 --eval_every 400 --name L16 \
        [--set model.seg_dim=32 ...]

The first call runs the real eval pipeline (letterbox, tokenisation; no augmentation) over the
RefShapes ``train`` and ``val`` splits once and caches the batches under ``--cache`` as
``<split>_<size>px.npz`` (train images in float16: about 2.8 GB for the default config). Every
call then trains the demo's configuration (``refjax.demo.demo_config`` plus ``--set``
overrides) with the real model, loss, optimizer and jitted step on shuffled in-memory batches,
and evaluates the whole val split every ``--eval_every`` steps with the real eval step and
metrics. It prints, and appends to ``--out`` (JSONL), per evaluation: step, examples seen,
training seconds (not counting the first, compiling step), the mean training losses since the
last evaluation, val Acc@0.5 / mIoU overall and per kind.

It answers "how many examples does this configuration need", which the 12-minute demo cannot:
on 2 cores the loader and the step compete, and a demo run measures both at once. Pin two runs
to one core each (``taskset -c 0`` / ``-c 1``) to compare configurations side by side.
Results are recorded in BENCHMARKS.md (RefShapes demo section).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

SPLITS = ("train", "val")


def cache_path(cache: str, split: str, image_size: int) -> str:
    return os.path.join(cache, f"{split}_{image_size}px.npz")


def build_cache(config, cache: str) -> None:
    """Run the eval pipeline over each split once and save its batches to ``cache``."""
    from refjax.data.pipeline import make_pipeline
    from refjax.tasks import get_task

    os.makedirs(cache, exist_ok=True)
    for split in SPLITS:
        path = cache_path(cache, split, int(config.data.image_size))
        if os.path.exists(path):
            continue
        t0, parts = time.time(), {}
        data_task = get_task(config.task).data_task(config)
        with make_pipeline(config.data, split, task=data_task, train=False, seed=0) as it:
            for batch in it:
                for k, v in batch.items():
                    v = np.asarray(v)
                    parts.setdefault(k, []).append(v.astype(np.float16) if k == "image" else v)
        arrays = {k: np.concatenate(v) for k, v in parts.items()}
        tmp = path[:-4] + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        print(f"cached {split}: {len(arrays['valid'])} rows in {time.time() - t0:.0f} s",
              flush=True)


def load_split(config, cache: str, split: str, valid_only: bool) -> dict[str, np.ndarray]:
    text_len = int(config.data.max_text_len)
    data = dict(np.load(cache_path(cache, split, int(config.data.image_size))))
    if data["text_ids"].shape[1] < text_len:
        raise ValueError(f"cache has text length {data['text_ids'].shape[1]} < {text_len}")
    for k in ("text_ids", "text_padding"):
        data[k] = data[k][:, :text_len]
    if valid_only:
        keep = data["valid"] > 0
        data = {k: v[keep] for k, v in data.items()}
    return data


def take(data: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    batch = {k: v[idx] for k, v in data.items()}
    batch["image"] = batch["image"].astype(np.float32)
    return batch


def main() -> None:
    from absl import flags

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--data_config", default="default")
    p.add_argument("--cache", required=True)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval_every", type=int, default=400)
    p.add_argument("--name", default="run")
    p.add_argument("--out", default=None, help="JSONL file to append results to")
    p.add_argument("--train_kinds", default="",
                   help="comma list: train only on these expression kinds (val keeps all)")
    p.add_argument("--set", action="append", default=[], dest="sets")
    args = p.parse_args()
    flags.FLAGS(["learning_curve"])  # grain reads absl flags

    import jax

    from refjax import demo
    from refjax.data.transforms import KINDS
    from refjax.train import setup, trainer
    from refjax.train.evaluator import evaluate_batches

    config = trainer.resolve_config(
        demo.demo_config(args.data_dir, args.data_config, ["train.progress=False", *args.sets])
    )
    build_cache(config, args.cache)
    train = load_split(config, args.cache, "train", valid_only=True)
    val = load_split(config, args.cache, "val", valid_only=False)
    if args.train_kinds:
        wanted = [KINDS.index(k) for k in args.train_kinds.split(",")]
        keep = np.isin(train["kind"], wanted)
        train = {k: v[keep] for k, v in train.items()}
    n, bs = len(train["valid"]), int(config.data.batch_size)

    s = setup.build(config, total_steps=args.steps, steps_per_epoch=max(1, n // bs))
    state = s.state

    def evaluate() -> dict:
        rows = len(val["valid"])
        batches = (take(val, np.arange(i, min(i + 256, rows))) for i in range(0, rows, 256))
        return evaluate_batches(s.task, config, s.eval_step, state.variables(), batches, s.mesh)

    rng = np.random.default_rng(int(config.train.seed))
    order, pos, train_s, window = rng.permutation(n), 0, 0.0, []
    with s.activate():
        for step in range(1, args.steps + 1):
            if pos + bs > n:
                order, pos = rng.permutation(n), 0
            batch = s.global_batch(take(train, order[pos:pos + bs]))
            pos += bs
            t0 = time.perf_counter()
            state, metrics = s.train_step(state, batch)
            if step % 10 == 0:
                window.append({k: float(v) for k, v in jax.device_get(metrics).items()
                               if k.startswith("loss")})
            if step > 1:  # step 1 includes compilation
                train_s += time.perf_counter() - t0
            if step % args.eval_every and step != args.steps:
                continue
            res = evaluate()
            losses = {k: float(np.mean([w[k] for w in window])) for k in (window or [{}])[0]}
            window = []
            row = {"name": args.name, "step": step, "examples": step * bs,
                   "train_s": round(train_s, 1), "losses": losses,
                   "val": {k: res.get(k) for k in ("acc@0.5", "miou", "oiou")},
                   "per_kind": {k.rsplit("/", 1)[0]: {m: res.get(f"{k.rsplit('/', 1)[0]}/{m}")
                                                      for m in ("acc@0.5", "miou")}
                                for k in res if k.endswith("/count")},
                   "sets": args.sets, "train_kinds": args.train_kinds}
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())
