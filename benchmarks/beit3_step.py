"""Forward+backward step of the BEiT-3 encoder: refjax (jit) vs torchscale (eager).

Same config, same thread count, alternating rounds in one process; prints step times, the
throughput ratio refjax/torchscale, and (with --jax-only on a GPU) the model FLOPs utilisation.

  python benchmarks/beit3_step.py                      # CPU, base width, 4 layers, 224 px
  python benchmarks/beit3_step.py --jax-only --depth 12 --dtype bfloat16 --batch 64  # GPU MFU

FLOPs are counted analytically (XLA's cost analysis counts a scanned layer body once). On CPU
the run also measures the single-matmul (sgemm) peak of both frameworks at the step's FFN
shape and prints the roofline: the highest ratio refjax could reach if its whole step ran at
its sgemm peak while torchscale kept its measured time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def _set_xla_flags() -> None:
    """XLA:CPU runs on every core (its default); ``--threads`` sets torch's thread count."""
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")


def _best_seconds(fn, n: int = 10) -> float:
    """Fastest of ``n`` timed calls of ``fn()`` (which must block until its result is ready)."""
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def _jax_step(args):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from refjax.models.beit3 import BEiT3, beit3_config

    cfg = beit3_config("base", depth=args.depth, img_size=args.img, dtype=args.dtype,
                       remat_policy=args.remat, scan=args.scan)
    model = BEiT3(cfg)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (args.batch, args.text)), jnp.int32)
    pad = jnp.zeros((args.batch, args.text), jnp.int32)
    img = jnp.asarray(rng.standard_normal((args.batch, args.img, args.img, 3)), jnp.float32)
    params = nn.unbox(model.init(jax.random.key(0), ids[:1], pad[:1], img[:1]))["params"]

    def loss_fn(p):
        out, _ = model.apply({"params": p}, ids, pad, img)
        return jnp.mean(jnp.square(out.astype(jnp.float32)))

    step = jax.jit(jax.value_and_grad(loss_fn))
    compiled = step.lower(params).compile()
    flops = step_flops(args)

    def run():
        loss, grads = compiled(params)
        jax.block_until_ready(grads)
        return float(loss)

    return run, flops, jax.devices()[0].platform


def _torch_step(args):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "shims"))
    import torch
    from torchscale.architecture.config import EncoderConfig
    from torchscale.model.BEiT3 import BEiT3 as TorchBEiT3

    torch.set_num_threads(args.threads)
    ecfg = EncoderConfig(img_size=args.img, patch_size=16, vocab_size=64010, multiway=True,
                         layernorm_embedding=False, normalize_output=True, no_output_layer=True,
                         encoder_embed_dim=768, encoder_attention_heads=12,
                         encoder_ffn_embed_dim=3072, encoder_layers=args.depth)
    model = TorchBEiT3(ecfg).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64010, (args.batch, args.text), generator=g)
    pad = torch.zeros((args.batch, args.text), dtype=torch.bool)
    img = torch.randn((args.batch, 3, args.img, args.img), generator=g)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(textual_tokens=ids, visual_tokens=img, text_padding_position=pad)
        loss = out["encoder_out"].square().mean()
        loss.backward()
        return float(loss.detach())

    return run


def step_flops(args) -> float:
    """Matmul FLOPs of one forward+backward step (backward = 2x forward; the patch embedding
    needs no input gradient). Elementwise work is not counted."""
    d, f, n_img = 768, 3072, (args.img // 16) ** 2
    tokens = n_img + 1 + args.text
    per_layer = 2 * tokens * (4 * d * d + 2 * d * f) + 2 * 2 * tokens * tokens * d
    patch = 2 * n_img * (16 * 16 * 3) * d
    return float(args.batch * (3 * args.depth * per_layer + 2 * patch))


def sgemm_peak(threads: int, with_torch: bool) -> dict[str, float]:
    """Best-of-10 GFLOP/s of one (1832 x 768) @ (768 x 3072) float32 matmul per framework."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    m, k, n = 1832, 768, 3072
    out = {}
    a = jnp.asarray(np.random.default_rng(0).standard_normal((m, k)), jnp.float32)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((k, n)), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    out["refjax_sgemm_gflops"] = 2 * m * k * n / _best_seconds(
        lambda: mm(a, b).block_until_ready()) / 1e9
    if with_torch:
        import torch

        torch.set_num_threads(threads)
        ta, tb = torch.from_numpy(np.array(a)), torch.from_numpy(np.array(b))
        ta @ tb
        out["torch_sgemm_gflops"] = 2 * m * k * n / _best_seconds(lambda: ta @ tb) / 1e9
    return out


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--text", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=3, help="steps per framework per round")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--remat", default="none")
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=False,
                   help="nn.scan the layers (default: unrolled, faster on XLA:CPU)")
    p.add_argument("--jax-only", action="store_true")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    _set_xla_flags()

    jax_run, flops, platform_name = _jax_step(args)
    jax_run()  # warm-up (compiled already; first run allocates)
    torch_run = None
    if not args.jax_only:
        torch_run = _torch_step(args)
        torch_run()
    jt, tt = [], []
    for r in range(args.rounds):
        for _ in range(args.iters):
            t0 = time.perf_counter()
            jax_run()
            jt.append(time.perf_counter() - t0)
        if torch_run is not None:
            for _ in range(args.iters):
                t0 = time.perf_counter()
                torch_run()
                tt.append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds}: refjax {statistics.median(jt[-args.iters:]):.3f}s"
              + (f"  torchscale {statistics.median(tt[-args.iters:]):.3f}s" if tt else ""),
              flush=True)
    res = {
        "config": vars(args), "platform": platform_name, "machine": platform.processor()
        or platform.machine(), "refjax_step_s": statistics.median(jt),
        "refjax_examples_per_s": args.batch / statistics.median(jt), "step_flops": flops,
    }
    res["refjax_step_gflops"] = flops / statistics.median(jt) / 1e9
    if tt:
        res["torchscale_step_s"] = statistics.median(tt)
        res["torchscale_examples_per_s"] = args.batch / statistics.median(tt)
        res["torchscale_step_gflops"] = flops / statistics.median(tt) / 1e9
        res["throughput_ratio"] = statistics.median(tt) / statistics.median(jt)
    if platform_name == "cpu":
        res.update(sgemm_peak(args.threads, with_torch=bool(tt)))
        if tt:
            # refjax at its sgemm peak for every FLOP of the step vs torchscale as measured
            res["roofline_max_ratio"] = (res["refjax_sgemm_gflops"] * 1e9 * statistics.median(tt)
                                         / flops)
    if platform_name == "gpu":
        import jax

        kind = jax.devices()[0].device_kind
        peak = next((v for k, v in PEAK_BF16.items() if k in kind), None)
        res["device_kind"] = kind
        if peak:
            res["mfu"] = flops / statistics.median(jt) / peak
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
