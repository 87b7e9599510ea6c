"""How many targets does the box-mask constraint lose to its top-left nearest downsample?

    python experiments/oneref_demo/box_mask_targets.py CACHE/val_128px.npz [--patches 16 8]

Reads a batch cache written by ``learning_curve.py`` and, for each patch size, applies the
constraint's own target downsample (``refjax.losses.oneref.patch_targets``: PyTorch 'nearest'
keeps the top-left pixel of each patch; spec/oneref.md 2.4) to every valid ground-truth mask.
Prints the fraction of targets left with no patch at all and the mean number of target patches.
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("cache_file")
    p.add_argument("--patches", type=int, nargs="+", default=[16, 8])
    args = p.parse_args()
    data = np.load(args.cache_file)
    from refjax.losses.oneref import patch_targets

    masks = data["mask"][data["valid"] > 0]
    for patch in args.patches:
        grid = masks.shape[-1] // patch
        cells = np.asarray(patch_targets(masks, grid * grid)).sum(1)
        print(f"patch {patch}: {len(masks)} targets, empty after downsample "
              f"{(cells == 0).mean():.3f}, mean target patches {cells.mean():.2f}")


if __name__ == "__main__":
    main()
