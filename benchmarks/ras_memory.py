"""RAS-13B per-device parameter + AdamW memory on 256-chip meshes, from ``eval_shape``.

Nothing is allocated: the parameter tree comes from ``jax.eval_shape`` of ``RAS(ras_13b())``,
each leaf's PartitionSpec from its logical axis names through ``refjax.parallel.rules_for``
(``fsdp_tp``; ``logical_shardings`` drops a mesh axis that does not divide a dimension, exactly
as training would), and the per-device shard shape from a ``NamedSharding`` over a
``jax.sharding.AbstractMesh`` of the given sizes (no devices needed). Bytes per device:

- params: every parameter, float32 (frozen towers included: they live in ``TrainState.frozen``);
- grads: float32 gradients of the trainable parameters (transient, one step);
- adamw: ``mu`` + ``nu`` (float32) of the trainable parameters;
- total: params + grads + adamw (activations, the KV cache and XLA temporaries not counted).

Trainable sets: stage 2/3 = everything but the four towers (spec 7); stage 1 = mask projector +
the two prefixes. Usage: ``python benchmarks/ras_memory.py [--decoding nar|ar]``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import jax
import numpy as np
from jax.sharding import AbstractMesh

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from refjax import parallel  # noqa: E402
from refjax.models import ras  # noqa: E402

GIB = 1 << 30
MESHES = (  # (data, fsdp, tensor), 256 chips each
    (1, 256, 1),
    (1, 64, 4),
    (4, 16, 4),
    (1, 32, 8),
    (8, 32, 1),
)
STAGE1 = ("mask_projector", "mask_pool_pre", "mask_ref_pre")


def per_device_bytes(abstract, sizes: tuple[int, int, int], rules) -> dict[str, int]:
    """Bytes per device of each top-level subtree's parameters on a (data, fsdp, tensor) mesh."""
    mesh = AbstractMesh(sizes, parallel.MESH_AXES)
    shardings = parallel.logical_shardings(abstract, mesh, rules)["params"]
    shapes = parallel.strip_boxes(abstract)["params"]
    out: dict[str, int] = {}
    for top in shapes:
        leaves = jax.tree.leaves(shapes[top])
        shs = jax.tree.leaves(shardings[top],
                              is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        out[top] = int(sum(math.prod(sh.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                           for x, sh in zip(leaves, shs)))
    return out


def replicated_fraction(abstract, sizes, rules, min_bytes: int = 1 << 20) -> list[str]:
    """Parameters >= ``min_bytes`` that keep an unsharded dimension a mesh axis of size > 1
    could not divide (a fully replicated one is also listed)."""
    mesh = AbstractMesh(sizes, parallel.MESH_AXES)
    shardings = parallel.logical_shardings(abstract, mesh, rules)["params"]
    shapes = parallel.strip_boxes(abstract)["params"]
    n_model = sizes[1] * sizes[2]
    notes = []
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    shs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    for (path, x), sh in zip(flat, shs):
        nbytes = math.prod(x.shape) * 4
        factor = math.prod(x.shape) // max(1, math.prod(sh.shard_shape(x.shape)))
        if nbytes >= min_bytes and factor < n_model:
            notes.append(f"{parallel.path_str(path)} {tuple(x.shape)}: split {factor}x of "
                         f"{n_model}")
    return notes


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decoding", default="nar", choices=("nar", "ar"))
    ap.add_argument("--verbose", action="store_true", help="list imperfectly split params")
    args = ap.parse_args(argv)
    cfg = ras.ras_13b(decoding=args.decoding)
    abstract = ras.abstract_variables(cfg, seq_len=8, pool_max=2, canvas=16)
    counts = ras.param_counts(abstract["params"])
    total = sum(counts.values())
    towers = set(cfg.encoder_names)
    print(f"RAS-13B ({args.decoding}) parameters: {total:,}")
    for k, v in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {k:16s} {v:>15,}{'  (frozen)' if k in towers else ''}")
    rules = parallel.rules_for("fsdp_tp")
    hdr = (f"{'mesh (data x fsdp x tensor)':28s} {'params':>8s} {'grads':>8s} {'adamw':>8s} "
           f"{'total':>8s} | {'stage-1 total':>13s}   (GiB per device)")
    print()
    print(hdr)
    print("-" * len(hdr))
    for sizes in MESHES:
        b = per_device_bytes(abstract, sizes, rules)
        params = sum(b.values())
        train = sum(v for k, v in b.items() if k not in towers)
        s1 = sum(v for k, v in b.items() if k in STAGE1)
        name = " x ".join(str(s) for s in sizes)
        print(f"{name:28s} {params / GIB:8.3f} {train / GIB:8.3f} {2 * train / GIB:8.3f} "
              f"{(params + 3 * train) / GIB:8.3f} | {(params + 3 * s1) / GIB:13.3f}")
        if args.verbose:
            for line in replicated_fraction(abstract, sizes, rules):
                print("    " + line)
    full = total * 4
    train_full = sum(v for k, v in counts.items() if k not in towers) * 4
    print(f"\nunsharded: params {full / GIB:.1f} GiB, + grads + AdamW "
          f"{(full + 3 * train_full) / GIB:.1f} GiB in all")


if __name__ == "__main__":
    main()
