"""Command line: ``python -m refjax {build-data, convert, export, bench, demo, demo-ras, train,
eval, predict, ras-features, train-tokenizer}``."""

from __future__ import annotations

import argparse
import logging
import os
import sys


class UserError(ValueError):
    """A mistake in the command line or its inputs: reported as one line, exit status 2."""


def _build_data(args: argparse.Namespace) -> int:
    from refjax.data.build import build_dataset

    path = build_dataset(args.name, args.config, args.data_dir, args.manual_dir,
                         skip_bad_records=args.skip_bad_records, span_parser=args.span_parser,
                         sts_scores=args.sts_scores)
    print(f"built {args.name} into {path}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from refjax.convert import cli

    if args.model == "ras":
        return _convert_ras(args)
    if args.model not in cli.MODELS:
        raise UserError(f"unknown model {args.model!r} for convert (supported: "
                        f"{(*cli.MODELS, 'ras')})")
    if len(args.paths) != 2:
        raise UserError(f"convert {args.model} takes INPUT OUTPUT, got {args.paths}")
    inp, out = args.paths
    if not os.path.exists(inp):
        raise UserError(f"input {inp!r} does not exist")
    print(cli.convert(args.model, inp, out, img_size=args.img_size, heads=args.heads,
                      variant=args.variant, scan=not args.no_scan, layout=args.layout,
                      eps=args.eps, mrefm=args.mrefm))
    return 0


def _convert_ras(args: argparse.Namespace) -> int:
    from refjax.convert import ras

    if len(args.paths) != 1 or not args.llm or not args.clip:
        raise UserError("convert ras takes --llm DIR --clip DIR [--siglip DIR --dinov2 DIR "
                        "--convnext DIR] OUTPUT")
    for flag in ("llm", "clip", "siglip", "dinov2", "convnext"):
        path = getattr(args, flag)
        if path and not os.path.exists(path):
            raise UserError(f"--{flag} {path!r} does not exist")
    ras.convert_cli(args.llm, args.clip, args.paths[0], siglip=args.siglip, dinov2=args.dinov2,
                    convnext=args.convnext, convnext_layout=args.layout or "hf",
                    convnext_eps=args.eps, decoding=args.decoding, scan=not args.no_scan)
    return 0


def _export(args: argparse.Namespace) -> int:
    from refjax.train.trainer import export_params

    _require_workdir(args.workdir)
    if args.official:
        from refjax.convert.oneref import export_official_cli

        if args.data_dir or args.set:
            raise UserError("--official writes a state_dict: --data-dir and --set do not apply")
        print(export_official_cli(args.workdir, args.out, args.step))
        return 0
    out = export_params(args.workdir, args.out, args.step, data_dir=args.data_dir,
                        sets=args.set or ())
    print(f"wrote {out} (parameters only)")
    return 0


def _ras_features(args: argparse.Namespace) -> int:
    from refjax.ras_features import run_args

    return run_args(args)


def _train_tokenizer(args: argparse.Namespace) -> int:
    from refjax.tokenizer_fit import run_args

    return run_args(args)


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

    demo.run(args.workdir, args.data_config, args.set, budget_min=args.budget_min)
    return 0


def _demo_ras(args: argparse.Namespace) -> int:
    """The shipped tiny RAS selects mask groups for RefShapes val expressions."""
    from refjax import demo_ras

    demo_ras.run(args.workdir, args.data_config, args.n)
    return 0


def _read_image(path: str):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise UserError(f"image {path!r} does not exist")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"cannot read image {path!r}: {e}") from e


def _require_workdir(path: str) -> None:
    if not os.path.isdir(path):
        raise UserError(f"workdir {path!r} does not exist")


def _predict(args: argparse.Namespace) -> int:
    from refjax.predict import Predictor

    if not args.text.strip():
        raise UserError("--text is empty: give the referring expression to ground")
    _require_workdir(args.workdir)
    image = _read_image(args.image)
    for m in args.ref_mask:
        if not os.path.isfile(m):
            raise UserError(f"reference mask {m!r} does not exist")
    if args.pool and args.pool != "auto" and not os.path.isfile(args.pool):
        raise UserError(f"pool {args.pool!r} does not exist (a COCO-RLE JSON file, or auto)")
    predictor = Predictor.from_workdir(args.workdir, step=args.step)
    from refjax.tasks.ras_predict import RASPredictor, run_cli

    if isinstance(predictor, RASPredictor):  # a mask group from a candidate pool
        run_cli(predictor, image, args.text, args.ref_mask, args.pool or "auto", args.out)
        return 0
    if args.ref_mask or args.pool:
        raise UserError("--ref-mask and --pool are for RAS runs; this run's task is "
                        f"{predictor.config.task!r}")
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
    try:
        apply_overrides(config, args.set or [])
    except KeyError as e:
        raise UserError(str(e.args[0]) if e.args else str(e)) from e
    return config


def _train(args: argparse.Namespace) -> int:
    import json

    from refjax.train.trainer import train

    result = train(_load_config(args), args.workdir, resume=args.resume,
                   overwrite=args.overwrite)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from refjax.train.trainer import evaluate

    _require_workdir(args.workdir)
    if args.config:
        config = _load_config(args)
    elif args.set:  # overrides on the run's own config.json (e.g. data.data_dir)
        from refjax.train.config import apply_overrides
        from refjax.train.trainer import load_config_json

        config = load_config_json(args.workdir)
        try:
            apply_overrides(config, args.set)
        except KeyError as e:
            raise UserError(str(e.args[0]) if e.args else str(e)) from e
    else:
        config = None
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
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build-data", help="build a TFDS dataset (ArrayRecord)")
    b.add_argument("name", help="refshapes | refcoco | refcoco+ | refcocog | grefcoco | "
                                "maskgroups_hq")
    b.add_argument("--config", default=None, help="builder config (refshapes: tiny | default)")
    b.add_argument("--data-dir", default=os.path.expanduser("~/tensorflow_datasets"))
    b.add_argument("--manual-dir", default=None, help="where the raw files of real data are")
    b.add_argument("--skip-bad-records", action="store_true",
                   help="skip and count bad records instead of failing on the first")
    b.add_argument("--span-parser", default="auto", choices=("auto", "spacy", "rules", "none"),
                   help="subject/object words of real data (auto: spaCy when installed with "
                        "an English model, else the documented rules; reported at build time)")
    b.add_argument("--sts-scores", default=None, metavar="SCORES.json",
                   help="real data: {expression id: [score per word]} for MRefM's STS label "
                        "(the paper's CLIP similarities, computed elsewhere)")
    b.set_defaults(fn=_build_data)

    c = sub.add_parser("convert", help="convert a PyTorch checkpoint to an Orbax checkpoint")
    c.add_argument("model", help="beit3 | oneref | vqkd | clip | siglip | dinov2 | "
                                 "dinov2_registers | convnext | llama | ras")
    c.add_argument("paths", nargs="+", metavar="INPUT OUTPUT",
                   help="INPUT: .pth (needs torch) or .safetensors file, or a Hugging Face "
                        "checkpoint directory (clip, siglip, dinov2, convnext, llama); OUTPUT: "
                        "the directory to write (must not exist); ras takes OUTPUT only")
    c.add_argument("--img-size", type=int, default=None,
                   help="target image size (positions interpolated bicubically), e.g. 384")
    c.add_argument("--heads", type=int, default=None, help="attention heads (default dim/64)")
    c.add_argument("--variant", default=None,
                   help="tiny | base | large: checks the shape and sets the attention heads")
    c.add_argument("--no-scan", action="store_true", help="unscanned layer layout")
    c.add_argument("--mrefm", action="store_true",
                   help="oneref: an MRefM pretraining checkpoint (keeps the mim/mlm heads)")
    c.add_argument("--layout", default=None, help="convnext: hf (default) | timm (timm/open_clip)")
    c.add_argument("--eps", type=float, default=None,
                   help="convnext: LayerNorm eps (timm/open_clip xxlarge uses 1e-5)")
    for tower in ("llm", "clip", "siglip", "dinov2", "convnext"):
        c.add_argument(f"--{tower}", default=None,
                       help=f"ras: the {tower} Hugging Face directory (LLaVA-1.5 layout read)")
    c.add_argument("--decoding", default="nar", choices=("nar", "ar"),
                   help="ras: non-autoregressive selection head or the AR baseline")
    c.set_defaults(fn=_convert)

    bn = sub.add_parser("bench", help="benchmarks/beit3_step.py (refjax vs torchscale step)")
    bn.add_argument("rest", nargs=argparse.REMAINDER)
    bn.set_defaults(fn=_bench)

    d = sub.add_parser("demo", help="the README's main job: train and evaluate on RefShapes")
    d.add_argument("--workdir", default="runs/demo")
    d.add_argument("--budget-min", type=float, default=15.0,
                   help="wall-clock minutes the whole demo is sized for (default 15)")
    d.add_argument("--data-config", default="default", help="RefShapes config: default | tiny")
    d.add_argument("--set", action="append", default=[],
                   help="config override key=value (repeatable), e.g. train.total_steps=200")
    d.set_defaults(fn=_demo)

    dr = sub.add_parser("demo-ras", help="the shipped tiny RAS selects mask groups for a few "
                                         "RefShapes val expressions")
    dr.add_argument("--workdir", default="runs/demo_ras")
    dr.add_argument("--data-config", default="default", help="RefShapes config: default | tiny")
    dr.add_argument("--n", type=int, default=8, help="how many val expressions")
    dr.set_defaults(fn=_demo_ras)

    pr = sub.add_parser("predict", help="box and mask (OneRef) or a mask group (RAS) for an "
                                        "image and a referring expression")
    pr.add_argument("--workdir", required=True, help="a training run directory")
    pr.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    pr.add_argument("--image", required=True)
    pr.add_argument("--text", required=True)
    pr.add_argument("--out", default=None, help="write the drawn prediction here (.png)")
    pr.add_argument("--ref-mask", action="append", default=[], metavar="MASK.png",
                    help="RAS: a reference mask for each <mask-ref> in the text, in order")
    pr.add_argument("--pool", default=None,
                    help="RAS: candidate masks as COCO-RLE JSON (what a SAM run writes), or "
                         "'auto' (a classical superpixel pool; real use wants SAM masks)")
    pr.set_defaults(fn=_predict)

    t = sub.add_parser("train", help="train any task (config.task: rec, res, mrefm, ras); "
                                     "resumes a run in the workdir")
    t.add_argument("--config", required=True, help="configs/oneref/rec_res.py:tiny[,task=res]")
    t.add_argument("--workdir", required=True)
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
    t.add_argument("--resume", action="store_true",
                   help="continue a run in --workdir even if its saved config differs")
    t.add_argument("--overwrite", action="store_true",
                   help="discard a run in --workdir whose saved config differs, start afresh")
    t.set_defaults(fn=_train)

    ex = sub.add_parser("export", help="a parameters-only copy of a run (e.g. to ship it)")
    ex.add_argument("--workdir", required=True)
    ex.add_argument("--out", required=True, help="output directory (must not exist); with "
                                                 "--official a .pth or .safetensors file")
    ex.add_argument("--official", action="store_true",
                    help="OneRef REC/RES or MRefM run: the official PyTorch state_dict layout")
    ex.add_argument("--step", type=int, default=None, help="default: best, else latest")
    ex.add_argument("--data-dir", default=None, help="data.data_dir written into its config")
    ex.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override written into its config (not the model: e.g. "
                         "data.num_workers=0, data.tokenizer_path=None)")
    ex.set_defaults(fn=_export)

    rf = sub.add_parser("ras-features",
                        help="RAS: run the frozen towers once per image, write a feature cache")
    from refjax.ras_features import add_arguments as ras_feature_arguments

    ras_feature_arguments(rf)
    rf.set_defaults(fn=_ras_features)

    tk = sub.add_parser("train-tokenizer",
                        help="fit the embedded k-means MIM tokenizer (MRefM targets) on a split")
    from refjax.tokenizer_fit import add_arguments

    add_arguments(tk)
    tk.set_defaults(fn=_train_tokenizer)

    e = sub.add_parser("eval", help="evaluate a train workdir's checkpoint")
    e.add_argument("--config", default=None, help="default: the workdir's config.json")
    e.add_argument("--workdir", required=True)
    e.add_argument("--splits", default=None, help="comma list (default: config eval.splits)")
    e.add_argument("--step", type=int, default=None, help="default: best, else latest")
    e.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="config override (on --config, else on the run's config.json)")
    e.set_defaults(fn=_eval)

    args = p.parse_args(argv)
    if args.debug:
        return args.fn(args)
    try:
        return args.fn(args)
    except _user_errors() as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"refjax {args.cmd}: error: {msg} (--debug shows the traceback)", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe a mistake in the inputs (one line, no traceback)."""
    from refjax.convert.common import ConversionError
    from refjax.data.errors import BadRecordError
    from refjax.train.trainer import ConfigMismatchError

    return (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
            BadRecordError, ConversionError, ConfigMismatchError, KeyError, ValueError)


if __name__ == "__main__":
    from refjax.allocator import reexec_with_allocator

    reexec_with_allocator(sys.argv[1:])  # mimalloc when installed (REFJAX_ALLOCATOR=system: off)
    sys.exit(main())
