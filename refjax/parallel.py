"""Device mesh, logical-axis rules, shardings from ``eval_shape``, and multi-host batch helpers.

Models name only logical axes (``embed``, ``mlp``, ``act_batch``, ...). One ordered rule table maps
them onto the mesh axes ``data``, ``fsdp`` and ``tensor``. Meshes always have Auto axis types
(``jax.sharding.Mesh``), and are entered with ``jax.set_mesh(mesh)`` plus
``nn.logical_axis_rules(rules)``, never ``with mesh:``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")

Rules = tuple[tuple[str, Any], ...]

# Ordered: the first rule whose mesh axes are still free for an array wins (flax semantics), so a
# logical name may appear again further down as a fallback. Axes of size 1 shard nothing, so this
# full table also serves meshes that have only a data axis.
DEFAULT_RULES: Rules = (
    # activations
    ("act_batch", BATCH_AXES),
    ("act_len", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("layers", None),
    ("patch", None),
    ("conv_in", None),
)

LOGICAL_AXES: tuple[str, ...] = tuple(name for name, _ in DEFAULT_RULES)
_TENSOR_NAMES = ("mlp", "heads", "vocab", "act_mlp", "act_heads")
LAYOUTS = ("dp", "fsdp", "fsdp_tp")


def rules_for(layout: str = "fsdp_tp") -> Rules:
    """The rule table for a layout.

    - ``dp``: parameters replicated; batch over ``(data, fsdp)`` (pure data parallel);
    - ``fsdp``: ``embed -> fsdp``, batch over ``(data, fsdp)``;
    - ``fsdp_tp``: as ``fsdp``, plus ``mlp/heads/vocab`` (and their activations) over ``tensor``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown sharding layout {layout!r}; expected one of {LAYOUTS}")
    out = []
    for name, axes in DEFAULT_RULES:
        is_param = not name.startswith("act_")
        keep = not (is_param and layout == "dp") and (
            layout == "fsdp_tp" or name not in _TENSOR_NAMES
        )
        out.append((name, axes if keep else None))
    return tuple(out)


def _mesh_sizes(cfg: Mapping[str, int] | Sequence[tuple[str, int]] | None) -> dict[str, int]:
    if cfg is None:
        items: Iterable[tuple[str, int]] = ()
    elif isinstance(cfg, Mapping) or hasattr(cfg, "items"):
        items = cfg.items()  # type: ignore[union-attr]
    else:
        items = cfg
    sizes = {name: 1 for name in MESH_AXES}
    given = dict(items)
    unknown = set(given) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
    sizes.update({k: int(v) for k, v in given.items()})
    if "data" not in given and all(v != -1 for v in sizes.values()):
        sizes["data"] = -1
    return sizes


def create_mesh(
    cfg: Mapping[str, int] | Sequence[tuple[str, int]] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh with axes ``(data, fsdp, tensor)`` and Auto axis types.

    ``cfg`` maps axis names to sizes (a ConfigDict works); missing axes have size 1, one size may
    be -1 (the rest of the devices), and ``data`` defaults to -1 when no size is -1.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = _mesh_sizes(cfg)
    n = len(devices)
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {free}")
    if any(v == 0 or v < -1 for v in sizes.values()):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {sizes}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n % known:
            raise ValueError(f"{n} devices cannot be split into a mesh {sizes}")
        sizes[free[0]] = n // known
    if math.prod(sizes.values()) != n:
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, have {n}")
    shape = tuple(sizes[name] for name in MESH_AXES)
    return Mesh(np.array(devices, dtype=object).reshape(shape), MESH_AXES)


def _divisible_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drop mesh axes from the dimensions they do not divide."""
    if len(spec) > len(shape):
        raise ValueError(f"partition spec {spec} has more entries than shape {tuple(shape)}")
    out = []
    for dim, axes in zip(shape, spec):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        names = tuple(a for a in names if a in mesh.shape)
        size = math.prod(mesh.shape[a] for a in names)
        if not names or dim % size:
            out.append(None)
        else:
            out.append(names[0] if len(names) == 1 else names)
    return P(*out)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def strip_boxes(tree: Any) -> Any:
    """Replace flax metadata boxes (``nn.LogicallyPartitioned``...) by their values.

    Unlike ``nn.unbox`` this never applies sharding constraints, so it is safe under a mesh.
    """
    return jax.tree.map(lambda x: x.value if _is_box(x) else x, tree, is_leaf=_is_box)


def _boxed_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """Shardings in the boxed structure of ``abstract_tree`` (boxes keep a NamedSharding)."""

    def one(x: Any) -> Any:
        inner = x.value if _is_box(x) else x
        if not hasattr(inner, "shape"):  # e.g. a box around an optax MaskedNode: no arrays
            return x
        if isinstance(x, nn.LogicallyPartitioned):
            spec = nn.logical_to_mesh_axes(x.names, rules)
        elif _is_box(x):
            spec = nn.get_partition_spec(x)
        else:
            spec = P()
        sharding = NamedSharding(mesh, _divisible_spec(spec, inner.shape, mesh))
        return x.replace_boxed(sharding) if _is_box(x) else sharding

    return jax.tree.map(one, abstract_tree, is_leaf=_is_box)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a (boxed) ``jax.eval_shape`` output, structured like the unboxed tree.

    Logical boxes go through the rules (as ``nn.get_partition_spec`` ->
    ``nn.logical_to_mesh_sharding``); unboxed leaves are replicated. A mesh axis that does not
    divide a dimension is dropped for that dimension, so odd-sized small arrays (biases, vocab
    rows) stay replicated instead of failing; ``assert_params_sharded`` catches large arrays that
    end up replicated this way.
    """
    return strip_boxes(_boxed_shardings(abstract_tree, mesh, rules))


def create_sharded(
    init_fn: Callable[..., Any], mesh: Mesh, rules: Rules, *args: Any
) -> tuple[Any, Any]:
    """Run ``init_fn(*args)`` directly into sharded arrays.

    ``eval_shape`` -> shardings from the logical boxes -> ``jax.jit(init_fn, out_shardings=...)``,
    all under ``jax.set_mesh(mesh)`` and the rules. Returns ``(unboxed arrays, shardings)``.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(init_fn, *args)
        boxed = _boxed_shardings(abstract, mesh, rules)
        out = jax.jit(init_fn, out_shardings=boxed)(*args)
    return strip_boxes(out), strip_boxes(boxed)


def path_str(path: Sequence[Any]) -> str:
    """'a/b/0/c' from a jax key path; the ``.value`` of flax metadata boxes is left out."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            if key.name != "value":
                parts.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return "/".join(parts)


def assert_params_sharded(params: Any, min_bytes: int = 1 << 20) -> None:
    """Raise ``ValueError`` naming every parameter of >= ``min_bytes`` that is fully replicated.

    Only arrays (or ``ShapeDtypeStruct`` with a sharding) on more than one device are checked.
    """
    bad = []
    for path, x in jax.tree_util.tree_flatten_with_path(strip_boxes(params))[0]:
        sharding = getattr(x, "sharding", None)
        if sharding is None or len(sharding.device_set) < 2:
            continue
        nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
        if nbytes >= min_bytes and sharding.is_fully_replicated:
            bad.append(f"{path_str(path)} {tuple(x.shape)} {np.dtype(x.dtype).name}")
    if bad:
        raise ValueError(
            f"{len(bad)} parameter(s) of >= {min_bytes} bytes are fully replicated: "
            + ", ".join(bad)
        )


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding for batches: the leading dimension over the mesh's batch axes ``(data, fsdp)``."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    return NamedSharding(mesh, P(axes))


def host_batch_to_global(batch_np: Any, mesh: Mesh) -> Any:
    """Assemble each process's local batch (a pytree of numpy arrays) into global jax Arrays.

    Leading dimensions are concatenated across processes in process order (global batch =
    process_count x local batch); scalars are replicated.
    """
    batch_sh = data_sharding(mesh)
    replicated = NamedSharding(mesh, P())

    def one(x: Any) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sh if x.ndim else replicated, x)

    return jax.tree.map(one, batch_np)
