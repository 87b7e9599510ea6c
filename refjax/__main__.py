"""Command line: ``python -m refjax {build-data, convert, bench, demo, train, eval, predict}``."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _build_data(args: argparse.Namespace) -> int:
    from refjax.data.build import build_dataset

    path = build_dataset(args.name, args.config, args.data_dir, args.manual_dir)
    print(f"built {args.name} into {path}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    import dataclasses

    from refjax.convert import beit3 as conv
    from refjax.convert.common import load_state_dict, save_params

    if args.model not in ("beit3", "oneref"):
        raise SystemExit(f"unknown model {args.model!r} for convert (supported: beit3, oneref)")
    sd = load_state_dict(args.input)
    inner, _ = conv.strip_prefix(sd)
    overrides = {"scan": not args.no_scan}
    if args.img_size:
        overrides["img_size"] = args.img_size
    if args.variant:
        from refjax.models.beit3 import VARIANTS

        if args.variant not in VARIANTS:
            raise SystemExit(f"unknown variant {args.variant!r}; one of {sorted(VARIANTS)}")
        overrides["heads"] = VARIANTS[args.variant]["heads"]
    if args.heads:
        overrides["heads"] = args.heads
    cfg = conv.infer_config(inner, **overrides)
    if args.variant:
        want = {k: VARIANTS[args.variant][k] for k in ("dim", "depth", "mlp_dim")}
        got = {k: getattr(cfg, k) for k in want}
        if got != want:
            raise SystemExit(f"checkpoint has {got}, variant {args.variant!r} has {want}")
    meta = {"model": args.model, "config": dataclasses.asdict(cfg),
            "source": os.path.abspath(args.input)}
    if args.model == "oneref":
        from refjax.convert import oneref

        variables, report = oneref.from_torch(sd, cfg, strict=True)
        meta["use_seg_head"] = "batch_stats" in variables
        print(report.summary())
        save_params(args.output, variables["params"], meta,
                    batch_stats=variables.get("batch_stats"))
        head = "REC+RES" if meta["use_seg_head"] else "REC"
        print(f"wrote {args.output} (OneRef {head}, BEiT-3 dim={cfg.dim} depth={cfg.depth} "
              f"img={cfg.img_size})")
        return 0
    params, report = conv.from_torch(sd, cfg, strict=True)
    print(report.summary())
    save_params(args.output, params, meta)
    print(f"wrote {args.output} (BEiT-3 dim={cfg.dim} depth={cfg.depth} img={cfg.img_size})")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import runpy

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(here, "benchmarks", "beit3_step.py")
    sys.argv = [script] + args.rest
    runpy.run_path(script, run_name="__main__")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """The README's main job: train OneRef (box + mask) on RefShapes, evaluate, report."""
    from refjax import demo

    demo.run(args.workdir, args.data_config, args.set)
    return 0


def _predict(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from refjax.predict import Predictor

    with Image.open(args.image) as im:
        image = np.asarray(im.convert("RGB"))
    predictor = Predictor.from_workdir(args.workdir, step=args.step)
    pred = predictor.predict(image, args.text)
    box = ", ".join(f"{v:.1f}" for v in pred["box_xyxy"])
    print(f"box_xyxy=[{box}] score={pred['score']:.3f}")
    if pred["mask"] is not None:
        print(f"mask: {int(pred['mask'].sum())} of {pred['mask'].size} pixels")
    if args.out:
        predictor.draw(image, pred, args.text).save(args.out)
        print(f"wrote {args.out}")
    return 0


def _load_config(args: argparse.Namespace):
    from refjax.train.config import apply_overrides, load_config

    config = load_config(args.config)
    apply_overrides(config, args.set or [])
    return config


def _train(args: argparse.Namespace) -> int:
    import json

    from refjax.train.trainer import train

    result = train(_load_config(args), args.workdir)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from refjax.train.trainer import evaluate

    config = _load_config(args) if args.config else None
    splits = [s for s in args.splits.split(",") if s] if args.splits else None
    result = evaluate(config, args.workdir, splits, args.step)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax", "tensorflow_datasets", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # keep refjax's own INFO readable
    p = argparse.ArgumentParser(prog="refjax", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build-data", help="build a TFDS dataset (ArrayRecord)")
    b.add_argument("name", help="refshapes | refcoco | refcoco+ | refcocog | grefcoco | "
                                "maskgroups_hq")
    b.add_argument("--config", default=None, help="builder config (refshapes: tiny | default)")
    b.add_argument("--data-dir", default=os.path.expanduser("~/tensorflow_datasets"))
    b.add_argument("--manual-dir", default=None, help="where the raw files of real data are")
    b.set_defaults(fn=_build_data)

    c = sub.add_parser("convert", help="convert a PyTorch checkpoint to an Orbax checkpoint")
    c.add_argument("model", help="beit3 | oneref")
    c.add_argument("input", help=".pth (needs torch) or .safetensors")
    c.add_argument("output", help="output directory (must not exist)")
    c.add_argument("--img-size", type=int, default=None,
                   help="target image size (positions interpolated bicubically), e.g. 384")
    c.add_argument("--heads", type=int, default=None, help="attention heads (default dim/64)")
    c.add_argument("--variant", default=None,
                   help="tiny | base | large: checks the shape and sets the attention heads")
    c.add_argument("--no-scan", action="store_true", help="unscanned layer layout")
    c.set_defaults(fn=_convert)

    bn = sub.add_parser("bench", help="benchmarks/beit3_step.py (refjax vs torchscale step)")
    bn.add_argument("rest", nargs=argparse.REMAINDER)
    bn.set_defaults(fn=_bench)

    d = sub.add_parser("demo", help="the README's main job: train and evaluate on RefShapes")
    d.add_argument("--workdir", default="runs/demo")
    d.add_argument("--data-config", default="default", help="RefShapes config: default | tiny")
    d.add_argument("--set", action="append", default=[],
                   help="config override key=value (repeatable), e.g. train.total_steps=200")
    d.set_defaults(fn=_demo)

    pr = sub.add_parser("predict", help="box (and mask) for an image and a referring expression")
    pr.add_argument("--workdir", required=True, help="a training run directory")
    pr.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    pr.add_argument("--image", required=True)
    pr.add_argument("--text", required=True)
    pr.add_argument("--out", default=None, help="write the drawn prediction here (.png)")
    pr.set_defaults(fn=_predict)

    t = sub.add_parser("train", help="train OneRef REC/RES (resumes from the workdir)")
    t.add_argument("--config", required=True, help="configs/oneref/rec_res.py:tiny[,task=res]")
    t.add_argument("--workdir", required=True)
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
    t.set_defaults(fn=_train)

    e = sub.add_parser("eval", help="evaluate a train workdir's checkpoint")
    e.add_argument("--config", default=None, help="default: the workdir's config.json")
    e.add_argument("--workdir", required=True)
    e.add_argument("--splits", default=None, help="comma list (default: config eval.splits)")
    e.add_argument("--step", type=int, default=None, help="default: best, else latest")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
    e.set_defaults(fn=_eval)

    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
