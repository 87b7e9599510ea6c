"""RAS frozen-encoder inputs and the precomputed feature cache (spec/ras.md 3.2, 13).

Inputs: :func:`square_pixels` is the one place an image becomes the towers' pixels: LLaVA's
``expand2square`` (the image pasted, centred, on a square of side ``max(w, h)`` filled with the
mean colour ``int(255 * mean)``, ``refjax.boxes.Expand2Square``), then a PIL bicubic resize of
the square to each encoder's input side ``Z`` (what the HF CLIP / SigLIP processors do on a
square image), kept as uint8; the per-encoder normalisation (``refjax.models.ras.
normalize_pixels`` with ``pixel_stats``) runs on the device.

Cache: the towers are frozen in every stage (spec 7), so their feature maps are a function of
the image alone. :func:`write_features` runs them once per image of the dataset's splits and
writes, into one directory::

    meta.json         format version, dtype, per encoder {shape: [h, w, D], input_size: Z},
                      the pad colour, the RAS tower configs, the image count and the splits
    ids.json          the image ids in row order (record order over the splits; an image
                      shared by several splits is stored once)
    <encoder>.bin     raw little-endian array (count, h, w, D) of ``dtype`` (float32 or
                      bfloat16), read with ``numpy.memmap`` (random access, shared page cache)
    towers/<encoder>  the tower's parameters that computed it (``refjax.convert.common.
                      save_params``), for predictors of runs trained on the cache

Rows are keyed by record index; a pipeline looks an example up by its image id (``ids.json``),
since its examples carry the record's image id and not its index. ``FeatureStore`` reads a
cache; ``RASTaskData`` (``refjax.tasks.ras``) puts ``features_<encoder>`` into the rows instead
of ``pixels_<encoder>`` when ``config.data.features_dir`` is set. The towers' weights: those of
``config.init`` when it holds them (a ``convert ras`` checkpoint, a train workdir), else the
random initialisation the train state would give them (``config.train.seed``, same key
derivation as ``refjax.train.state.create_train_state``), so a pixel run and a cache run of one
config start from the same model.

Command: ``python -m refjax ras-features --config CFG [--set k=v ...] --out DIR`` (``--out``
default: ``<dataset dir>/ras_features``), see :func:`add_arguments` / :func:`run_args`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from refjax.boxes import Expand2Square

FORMAT_VERSION = 1
META_FILE = "meta.json"
IDS_FILE = "ids.json"
TOWERS_DIR = "towers"
DTYPES = ("float32", "bfloat16")


# ----------------------------------------------------------------------------- pixels
def pad_fill(mean: Sequence[float]) -> tuple[int, ...]:
    """LLaVA's pad colour of ``expand2square``: ``int(255 * m)`` per channel."""
    return tuple(int(255 * float(m)) for m in mean)


def square_pixels(
    image: np.ndarray, sizes: Mapping[str, int], fill: Sequence[int]
) -> dict[str, np.ndarray]:
    """uint8 (H, W, 3) image -> ``{name: uint8 (Z, Z, 3)}``: ``expand2square`` with ``fill``
    then a PIL bicubic resize of the square to each ``Z`` (module docstring)."""
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    return resize_square(Expand2Square(w, h, 1).pad_image(img, tuple(fill)), sizes)


def resize_square(square: np.ndarray, sizes: Mapping[str, int]) -> dict[str, np.ndarray]:
    """A uint8 (side, side, 3) padded square -> ``{name: uint8 (Z, Z, 3)}`` (PIL bicubic;
    the square itself when ``Z == side``)."""
    sq = Image.fromarray(np.asarray(square, np.uint8))
    out: dict[str, np.ndarray] = {}
    cache: dict[int, np.ndarray] = {}
    for name, z in sizes.items():
        z = int(z)
        if z not in cache:
            im = sq if sq.size[0] == z else sq.resize((z, z), Image.BICUBIC)
            cache[z] = np.asarray(im, np.uint8)
        out[name] = cache[z]
    return out


def storage_dtype(name: str) -> np.dtype:
    """numpy dtype of a cache dtype name (``bfloat16`` through ml_dtypes)."""
    if name == "float32":
        return np.dtype(np.float32)
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    raise ValueError(f"unknown feature dtype {name!r}; one of {DTYPES}")


# ----------------------------------------------------------------------------- reading
class FeatureStore:
    """A feature cache directory (module docstring), opened lazily in each process: picklable
    (grain workers), the memory maps are not pickled."""

    def __init__(self, path: str):
        self.path = os.path.abspath(os.path.expanduser(path))
        self._meta: dict[str, Any] | None = None
        self._rows: dict[str, int] | None = None
        self._maps: dict[str, np.memmap] = {}

    def __getstate__(self) -> dict:
        return {"path": self.path, "_meta": None, "_rows": None, "_maps": {}}

    @property
    def meta(self) -> dict[str, Any]:
        if self._meta is None:
            f = os.path.join(self.path, META_FILE)
            if not os.path.isfile(f):
                raise FileNotFoundError(
                    f"no RAS feature cache at {self.path} (no {META_FILE}); write it with "
                    "`python -m refjax ras-features --config ... --out DIR`")
            with open(f) as fh:
                meta = json.load(fh)
            if meta.get("version") != FORMAT_VERSION:
                raise ValueError(f"{f}: format version {meta.get('version')} != "
                                 f"{FORMAT_VERSION}; rewrite the cache")
            self._meta = meta
        return self._meta

    @property
    def dtype(self) -> np.dtype:
        return storage_dtype(self.meta["dtype"])

    def shapes(self) -> dict[str, tuple[int, int, int]]:
        return {n: tuple(e["shape"]) for n, e in self.meta["encoders"].items()}

    def _row(self, image_id: str) -> int | None:
        if self._rows is None:
            with open(os.path.join(self.path, IDS_FILE)) as f:
                self._rows = {str(k): i for i, k in enumerate(json.load(f))}
        return self._rows.get(str(image_id))

    def _map(self, name: str) -> np.memmap:
        if name not in self._maps:
            shape = (int(self.meta["count"]), *self.shapes()[name])
            self._maps[name] = np.memmap(os.path.join(self.path, f"{name}.bin"), self.dtype,
                                         mode="r", shape=shape)
        return self._maps[name]

    def __contains__(self, image_id: str) -> bool:
        return self._row(image_id) is not None

    def lookup(self, image_id: str, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """``{encoder: (h, w, D) array}`` of an image (copies); ``KeyError`` if absent."""
        row = self._row(image_id)
        if row is None:
            raise KeyError(image_id)
        names = list(self.shapes()) if names is None else list(names)
        return {n: np.array(self._map(n)[row]) for n in names}

    def check(self, expected: Mapping[str, tuple[int, int, int]], dtype: str) -> None:
        """Raise ``ValueError`` unless the cache holds ``expected`` shapes in ``dtype``."""
        shapes = self.shapes()
        missing = sorted(set(expected) - set(shapes))
        if missing:
            raise ValueError(f"feature cache {self.path} lacks encoders {missing} "
                             f"(has {sorted(shapes)})")
        bad = {n: (shapes[n], tuple(s)) for n, s in expected.items()
               if tuple(shapes[n]) != tuple(s)}
        if bad:
            raise ValueError(f"feature cache {self.path}: shapes (cached, model) differ: {bad}")
        if self.meta["dtype"] != dtype:
            raise ValueError(f"feature cache {self.path} is {self.meta['dtype']}, the config "
                             f"asks for {dtype} (data.features_dtype)")

    def tower_params(self, names: Sequence[str]) -> dict[str, Any]:
        """The tower parameters that computed the cache (``towers/<name>``)."""
        from refjax.convert.common import load_params

        return {n: load_params(os.path.join(self.path, TOWERS_DIR, n))[0] for n in names}


def model_fill_mean(cfg: Any) -> tuple[float, ...]:
    """The mean colour ``expand2square`` pads with: the image encoder's mean (LLaVA: CLIP's),
    else the first ViT tower's, else OpenAI CLIP's."""
    from refjax.models.ras import pixel_stats

    name = cfg.image_encoder if cfg.image_encoder in cfg.encoder_names else cfg.encoder_names[0]
    return pixel_stats(cfg, name)[0]
