"""``python -m refjax ras-features``: run RAS's frozen towers once per image and write the
feature cache that ``refjax.data.ras_features.FeatureStore`` reads (train with
``--set data.features_dir=DIR``). A command-level module: it reads configs and train workdirs,
so it sits beside the CLI, above ``data/`` (which only reads caches).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from refjax.data.ras_features import (  # noqa: F401  (the cache format lives with the reader)
    FORMAT_VERSION,
    IDS_FILE,
    META_FILE,
    TOWERS_DIR,
    model_fill_mean,
    pad_fill,
    resize_square,
    square_pixels,
    storage_dtype,
)


# ----------------------------------------------------------------------------- writing
def _tower_source(config: Any, cfg: Any) -> tuple[dict[str, Any], str]:
    """``({name: params}, description)`` of the towers (module docstring)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from refjax.models.ras import RAS

    names = cfg.encoder_names
    init = config.get("init") if hasattr(config, "get") else None
    if init:
        from refjax.train.state import read_variables

        loaded, _ = read_variables(str(init))
        trees = {**(loaded.get("params") or {}), **(loaded.get("frozen") or {})}
        found = {n: trees[n] for n in names if n in trees}
        if len(found) == len(names):
            return found, f"init {init}"
        if found:
            raise ValueError(f"init {init} holds towers {sorted(found)} but not "
                             f"{sorted(set(names) - set(found))}")
    init_key, _ = jax.random.split(jax.random.key(int(config.train.seed)))
    pixels = {n: jnp.zeros((1, cfg.input_size(n), cfg.input_size(n), 3), jnp.float32)
              for n in names}
    variables = jax.jit(lambda k: RAS(cfg).init({"params": k, "dropout": k}, pixels=pixels,
                                                method=RAS.encode))(init_key)
    params = nn.unbox(variables["params"])
    return ({n: params[n] for n in names},
            f"random init (train.seed={int(config.train.seed)})")


def encode_fn(cfg: Any):
    """jitted ``(tower params, {name: uint8 (B, Z, Z, 3)}) -> {name: (B, h, w, D) float32}``:
    the normalisation and the towers exactly as the RAS task runs them."""
    import jax
    import jax.numpy as jnp

    from refjax.models.ras import RAS, normalize_pixels, pixel_stats

    model = RAS(cfg)
    stats = {n: pixel_stats(cfg, n) for n in cfg.encoder_names}

    @jax.jit
    def run(params, pixels):
        x = {n: normalize_pixels(pixels[n], *stats[n]) for n in cfg.encoder_names}
        # RAS.setup declares the prefix embeddings: unused by encode, given as zeros
        zero = jnp.zeros((cfg.d,), jnp.float32)
        p = {**params, "mask_pool_pre": zero, "mask_ref_pre": zero}
        return model.apply({"params": p}, pixels=x, method=RAS.encode)

    return run


def write_features(
    config: Any,
    out_dir: str | None = None,
    splits: Sequence[str] | None = None,
    *,
    batch_size: int = 16,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the frozen towers of ``config`` (a RAS config) once per image of ``splits``
    (default: every split of the dataset) and write the cache to ``out_dir`` (default
    ``<dataset dir>/ras_features``). Returns stats (images, seconds, bytes, directory)."""
    from refjax.convert.common import save_params
    from refjax.data.sources import dataset_dir, open_split
    from refjax.tasks.ras import model_config

    cfg = model_config(config)
    d = config.data
    if out_dir is None:
        out_dir = os.path.join(dataset_dir(d.dataset, d.data_dir, d.dataset_config),
                               "ras_features")
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if os.path.exists(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists; remove it or pass overwrite")
        shutil.rmtree(out_dir)
    if splits is None:
        import tensorflow_datasets as tfds

        path = dataset_dir(d.dataset, d.data_dir, d.dataset_config)
        splits = list(tfds.builder_from_directory(path).info.splits.keys())
    dtype_name = str(d.features_dtype)
    dtype = storage_dtype(dtype_name)
    names = cfg.encoder_names
    sizes = {n: cfg.input_size(n) for n in names}
    shapes = {n: (*cfg.grid(n), cfg.feature_dim(n)) for n in names}
    fill = pad_fill(model_fill_mean(cfg))
    params, source = _tower_source(config, cfg)
    run = encode_fn(cfg)

    # one pass over the records in split order; an image already written is skipped (files
    # are sized for every record and truncated to the images written)
    srcs = {sp: open_split(d, sp) for sp in splits}
    total = sum(len(src) for src in srcs.values())
    tmp = out_dir + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    t0 = time.perf_counter()
    maps = {n: np.memmap(os.path.join(tmp, f"{n}.bin"), dtype, mode="w+",
                         shape=(max(total, 1), *shapes[n])) for n in names}
    ids: list[str] = []
    seen: set[str] = set()
    batch: list[tuple[int, dict[str, np.ndarray]]] = []

    def flush() -> None:
        if not batch:
            return
        px = {n: np.stack([p[n] for _, p in batch]) for n in names}
        pad = batch_size - len(batch)  # one program: the last batch is padded
        if pad:
            px = {n: np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
                  for n, x in px.items()}
        feats = run(params, px)
        for n in names:
            f = np.asarray(feats[n], np.float32).astype(dtype)
            for j, (row, _) in enumerate(batch):
                maps[n][row] = f[j]
        batch.clear()

    for src in srcs.values():
        for i in range(len(src)):
            sc = src.scene(i, with_pool=False)
            rid = str(sc["image_id"])
            if rid in seen:
                continue
            seen.add(rid)
            batch.append((len(ids), square_pixels(sc["image"], sizes, fill)))
            ids.append(rid)
            if len(batch) == batch_size:
                flush()
                if progress and len(ids) % (batch_size * 16) == 0:
                    print(f"ras-features: {len(ids)}/{total} images", flush=True)
    flush()
    count = len(ids)
    for m in maps.values():
        m.flush()
    maps.clear()
    for n in names:
        row_bytes = int(np.prod(shapes[n])) * dtype.itemsize
        os.truncate(os.path.join(tmp, f"{n}.bin"), count * row_bytes)
    for n in names:
        save_params(os.path.join(tmp, TOWERS_DIR, n), params[n],
                    {"model": "ras_tower", "encoder": n, "source": source})
    meta = {
        "version": FORMAT_VERSION,
        "dtype": dtype_name,
        "count": count,
        "encoders": {n: {"shape": list(shapes[n]), "input_size": sizes[n]} for n in names},
        "fill": list(fill),
        "splits": list(splits),
        "dataset": {"name": d.dataset, "config": d.dataset_config},
        "towers": {n: dict(_tower_meta(cfg, n)) for n in names},
        "tower_source": source,
    }
    with open(os.path.join(tmp, IDS_FILE), "w") as f:
        json.dump(ids, f)
    with open(os.path.join(tmp, META_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    os.replace(tmp, out_dir)
    seconds = time.perf_counter() - t0
    nbytes = sum(count * int(np.prod(shapes[n])) * dtype.itemsize for n in names)
    return {"dir": out_dir, "images": count, "seconds": seconds, "bytes": nbytes,
            "tower_source": source}


def _tower_meta(cfg: Any, name: str) -> dict[str, Any]:
    import dataclasses

    c = cfg.encoder_configs[name]
    d = c.to_dict() if hasattr(c, "to_dict") else dataclasses.asdict(c)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


# ----------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``ras-features`` arguments (for the ``python -m refjax`` subparser)."""
    p.add_argument("--config", required=True, help="a RAS config, e.g. configs/ras/stage2.py:tiny")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (repeatable)")
    p.add_argument("--out", default=None,
                   help="cache directory (default: <dataset dir>/ras_features); then train "
                        "with --set data.features_dir=DIR")
    p.add_argument("--splits", default=None, help="comma list (default: every split)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache")


def run_args(args: argparse.Namespace) -> int:
    """Run :func:`write_features` from parsed :func:`add_arguments` arguments; prints stats."""
    from refjax.train.config import apply_overrides, load_config

    config = load_config(args.config)
    apply_overrides(config, args.set or [])
    from refjax.train.trainer import prepare_data, resolve_config

    prepare_data(config)
    config = resolve_config(config)
    splits = [s for s in (args.splits or "").split(",") if s.strip()] or None
    out = write_features(config, args.out, splits, batch_size=int(args.batch_size),
                         overwrite=bool(args.overwrite))
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m refjax.ras_features ...`` (standalone entry point)."""
    p = argparse.ArgumentParser(prog="refjax ras-features", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run_args(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
