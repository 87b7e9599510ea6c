"""RAS decoding latency: one NAR forward vs AR [SEG] decoding, at equal candidate pools.

The paper reports 0.56 s (NAR) vs 2.13 s (AR) per query for RAS-13B (3.8x; spec 10.3). This
measures the same two programs of ``refjax.models.ras`` for a tiny RAS on this machine's
backend (default: ``ras_tiny``, a 2-layer d=64 LLaMA; ``--layers/--width`` give a larger
LLM), batch 1, pools of 16 / 32 / 64 candidates, in one run.

What is timed (median of ``--runs`` calls after a warm-up call that compiles; each call
blocks on its outputs; the programs are called in turn so they share the machine's load, and
AR/NAR is the median of the per-round ratios):

- NAR: ``jit(RAS.__call__)`` on the full layout (prefix, global image tokens, first copy of
  the pool, query with one reference, " ASSISTANT:", second copy of the pool): mask pooling
  and projection of every candidate and the reference, splicing, one LLM forward without
  vocabulary logits, the head -> one logit per candidate; plus the selection ``logits > 0``.
- AR: ``ras.ar_generate`` (one jitted program): the same prompt without the second copy
  prefilled into a KV cache, then ``--targets`` one-token steps (``[SEG]`` fed back, each
  scored against the candidates) and ``--targets + 1`` [SEG]-vs-EOS decisions, i.e. the
  cost of emitting ``targets`` [SEG]s and an EOS with early exit impossible inside a static
  program (a Python loop of per-token calls would add host overhead per step). Also shown:
  the AR prefill alone and ``(AR - prefill) / targets``, the cost of one decoding step.

Both read the same precomputed encoder features (the towers are frozen and their cost is
the same for both; ``--pixels`` includes them). Usage:
``python benchmarks/ras_forward.py [--runs 20] [--targets 3] [--layers 2 --width 64]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np
from flax import linen as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from refjax.data import ras_layout as rl  # noqa: E402
from refjax.models import ras  # noqa: E402

CANVAS = 64
PH = 99  # <mask-ref> placeholder id
TEMPLATE = rl.Template("v1", prefix=(1, *range(10, 44)), newline=(13,), assistant=(14, 15),
                       eos=2, ref_placeholder=PH)  # 35-token system prefix as spec 5.2
QUERY = [20, 21, 22, PH, 23, 24, 25, 26]


def _config(args) -> ras.RASConfig:
    cfg = ras.ras_tiny(decoding="ar")
    if args.layers or args.width:
        llm = cfg.llm.replace(
            num_hidden_layers=args.layers or cfg.llm.num_hidden_layers,
            hidden_size=args.width or cfg.llm.hidden_size,
            intermediate_size=2 * (args.width or cfg.llm.hidden_size),
            num_attention_heads=max(1, (args.width or cfg.llm.hidden_size) // 64),
            num_key_value_heads=None, head_dim=None)
        cfg = cfg.replace(llm=llm)
    return cfg


def _inputs(cfg, n, decoding, rng, pixels):
    lc = rl.LayoutConfig(max_len=64 + 4 * n + 8, pool_max=n, refs_max=1,
                         num_image_tokens=cfg.num_image_tokens, decoding=decoding, seg_max=8,
                         seg_token_id=cfg.seg_token_id)
    lay = rl.stack([rl.build_layout("bench", QUERY, n, 1, TEMPLATE, lc)])
    length = int(lay["length"][0])
    keep = ("input_ids", "slot_index", "attention_mask") + (("cand_pos",) if decoding == "nar"
                                                            else ())
    out = {k: lay[k][:, :length] for k in keep}
    masks = np.zeros((1, n, CANVAS, CANVAS), np.uint8)
    for i in range(n):
        y, x = rng.integers(0, CANVAS - 16, 2)
        masks[0, i, y:y + 12, x:x + 12] = 1
    out["pool_masks"] = masks
    out["ref_masks"] = masks[:, :1]
    out["pool_valid"] = np.ones((1, n), np.int32)
    if pixels:
        out["pixels"] = {e: rng.standard_normal((1, cfg.input_size(e), cfg.input_size(e), 3))
                         .astype(np.float32) for e in cfg.encoder_names}
    else:
        out["features"] = {e: rng.standard_normal((1, *cfg.grid(e), cfg.feature_dim(e)))
                           .astype(np.float32) for e in cfg.encoder_names}
    return out, length


def _time_interleaved(fns, runs: int) -> list[list[float]]:
    """Seconds per call of each of ``fns``, called in turn ``runs`` times (after one warm-up
    call each, which compiles), so that every function sees the same machine load."""
    for fn in fns:
        jax.block_until_ready(fn())
    ts: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, out in zip(fns, ts):
            t = time.perf_counter()
            jax.block_until_ready(fn())
            out.append(time.perf_counter() - t)
    return ts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pools", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--targets", type=int, default=3)
    ap.add_argument("--layers", type=int, default=0, help="LLM layers (default: tiny's 2)")
    ap.add_argument("--width", type=int, default=0, help="LLM width (default: tiny's 64)")
    ap.add_argument("--pixels", action="store_true", help="run the towers too")
    args = ap.parse_args(argv)
    cfg_ar = _config(args)
    cfg_nar = cfg_ar.replace(decoding="nar")
    rng = np.random.default_rng(0)
    abstract = ras.abstract_variables(cfg_ar, pixels=args.pixels, canvas=CANVAS)
    variables = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32),
                             nn.unbox(abstract))
    head = ras.abstract_variables(cfg_nar, pixels=False)["params"]["head"]
    nar_vars = {"params": {**{k: v for k, v in variables["params"].items() if k != "seg_proj"},
                           "head": jax.tree.map(
                               lambda s: (0.05 * rng.standard_normal(s.shape)).astype(
                                   np.float32), nn.unbox(head))}}
    variables, nar_vars = jax.device_put((variables, nar_vars))  # no host copies in the timing
    nar_model = ras.RAS(cfg_nar)
    ar_model = ras.RAS(cfg_ar)
    llm = cfg_ar.llm
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); LLM "
          f"{llm.num_hidden_layers} layers d={llm.hidden_size}; encoders "
          f"{'run' if args.pixels else 'precomputed'}; batch 1; AR emits {args.targets} "
          f"[SEG] + EOS; median of {args.runs} runs")
    hdr = (f"{'pool':>5s} {'NAR len':>8s} {'NAR ms':>9s} {'AR prompt':>10s} {'AR ms':>9s} "
           f"{'prefill':>9s} {'ms/step':>8s} {'AR/NAR':>7s}")
    print(hdr)
    print("-" * len(hdr))

    @jax.jit
    def nar(v, x):
        x = dict(x)
        logits, _ = nar_model.apply(v, x.pop("input_ids"), x.pop("slot_index"),
                                    x.pop("attention_mask"), x.pop("cand_pos"), **x)
        return logits > 0

    @jax.jit
    def prefill(v, x):
        x = dict(x)
        x.pop("pool_valid")
        ids = x.pop("input_ids")
        return ar_model.apply(v, ids, x.pop("slot_index"), x.pop("attention_mask"), **x,
                              cache_length=ids.shape[1] + args.targets,
                              method=ras.RAS.ar_prefill)

    for n in args.pools:
        x_nar, len_nar = _inputs(cfg_nar, n, "nar", rng, args.pixels)
        x_nar.pop("pool_valid")
        x_ar, len_ar = _inputs(cfg_ar, n, "ar", rng, args.pixels)
        x_nar, x_ar = jax.device_put((x_nar, x_ar))
        t_nar, t_ar, t_pre = _time_interleaved([
            lambda x_nar=x_nar: nar(nar_vars, x_nar),
            lambda x_ar=x_ar: ras.ar_generate(ar_model, variables, x_ar, max_segs=args.targets),
            lambda x_ar=x_ar: prefill(variables, x_ar)], args.runs)
        ratio = statistics.median(a / b for a, b in zip(t_ar, t_nar))
        t_nar, t_ar, t_pre = map(statistics.median, (t_nar, t_ar, t_pre))
        step = (t_ar - t_pre) / args.targets
        print(f"{n:5d} {len_nar:8d} {1e3 * t_nar:9.2f} {len_ar:10d} {1e3 * t_ar:9.2f} "
              f"{1e3 * t_pre:9.2f} {1e3 * step:8.2f} {ratio:7.2f}")


if __name__ == "__main__":
    main()
