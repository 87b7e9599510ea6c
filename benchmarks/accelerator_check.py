"""Everything refjax can only show on an accelerator, in one run of a few minutes, as one table.

    python benchmarks/accelerator_check.py            # on a GPU (or TPU) machine
    python benchmarks/accelerator_check.py --smoke    # tiny sizes on CPU (tests run this)

1. BEiT-3 base forward+backward in bfloat16 (parameters float32): step time, analytic matmul
   FLOPs (``benchmarks/beit3_step.py``'s count: XLA's cost analysis counts a scanned layer
   once), MFU against the device's bf16 peak, with the attention path that the model picks on
   the device (``jax.nn.dot_product_attention``: cuDNN's fused kernel for bf16 on NVIDIA GPUs)
   and, for comparison, the einsum path.
2. A few OneRef-base REC+RES train steps at 384 px through the real sharded step
   (``refjax.train.setup.build`` on all local devices, fsdp layout, bf16 compute): step time,
   examples/s and the peak device memory (``memory_stats``).

The smoke mode runs the same code at dim 64 / 2 layers / 64 px on the CPU so it cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

# Dense bf16 peaks (FLOP/s) by device kind substring.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "TPU v5": 197e12,
             "TPU v4": 275e12}


def _median_time(fn, warmup: int, iters: int) -> float:
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def encoder_flops(dim: int, mlp_dim: int, depth: int, img: int, patch: int, text: int) -> float:
    """Analytic matmul FLOPs of one example's BEiT-3 joint-encoder forward + backward (3x the
    forward): per layer the four attention projections, the FFN, QK^T and AV; plus the patch
    embedding's forward and its weight gradient."""
    n_img = (img // patch) ** 2
    tokens = n_img + 1 + text
    per_layer = 2 * tokens * (4 * dim * dim + 2 * dim * mlp_dim) + 2 * 2 * tokens * tokens * dim
    return 3 * depth * per_layer + 2 * 2 * n_img * patch**2 * 3 * dim


def demo_flops() -> float:
    """``encoder_flops`` of the demo's model (``refjax.demo.MODEL`` on the tiny config)."""
    from refjax.demo import MODEL
    from refjax.train.config import apply_overrides, load_config

    c = load_config(os.path.join(HERE, "configs/oneref/rec_res.py:tiny,task=res"))
    apply_overrides(c, list(MODEL))
    return encoder_flops(int(c.model.dim), int(c.model.mlp_dim), int(c.model.depth),
                         int(c.data.image_size), int(c.model.patch_size),
                         int(c.data.max_text_len))


def beit3_mfu(smoke: bool, attention: str | None) -> dict:
    """Forward+backward of a BEiT-3 joint encoder in bf16; ``attention`` None = the default."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from refjax.models.beit3 import BEiT3, beit3_config

    depth, img, text, batch = (2, 64, 8, 2) if smoke else (12, 224, 32, 32)
    dims = dict(dim=64, heads=4, mlp_dim=256, vocab_size=128) if smoke else {}
    cfg = beit3_config("base", depth=depth, img_size=img, dtype="bfloat16", scan=True,
                       attention_impl=attention, **dims)
    model = BEiT3(cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, text)),
                      jnp.int32)
    pad = jnp.zeros((batch, text), jnp.int32)
    image = jnp.ones((batch, img, img, 3), jnp.float32)
    params = jax.jit(model.init)(jax.random.key(0), ids, pad, image)["params"]

    @jax.jit
    def step(p):
        def loss(p):
            out, _ = model.apply({"params": p}, ids, pad, image)
            return jnp.mean(jnp.square(out.astype(jnp.float32)))

        return jax.grad(loss)(p)

    secs = _median_time(lambda: step(params), 1 if smoke else 2, 1 if smoke else 10)
    flops = batch * encoder_flops(cfg.dim, cfg.mlp_dim, depth, img, cfg.patch_size, text)
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_BF16.items() if k in kind), None)
    return {"case": f"beit3 {'tiny' if smoke else 'base'} bf16 fwd+bwd "
                    f"attn={attention or 'default'}", "step_s": secs,
            "tflops": flops / secs / 1e12, "mfu": (flops / secs / peak) if peak else None}


def oneref_steps(smoke: bool) -> dict:
    """A few real, sharded OneRef REC+RES train steps (bf16 compute) on all local devices."""
    import jax
    import numpy as np

    from refjax import parallel
    from refjax.train import setup
    from refjax.train.config import apply_overrides, load_config

    arg = "tiny,task=res" if smoke else "base,task=res"
    config = load_config(os.path.join(HERE, f"configs/oneref/rec_res.py:{arg}"))
    sets = ["loss.use_box_loss=True", "loss.use_box_mask_constraint=True",
            "model.dtype=bfloat16"]
    if smoke:
        sets += ["model.dim=64", "model.depth=2", "model.heads=4", "model.mlp_dim=128",
                 "model.img_size=64", "data.batch_size=8", "data.max_text_len=8"]
    else:
        sets += [f"data.batch_size={8 * jax.device_count()}"]  # 8 per device
    apply_overrides(config, sets)
    with config.unlocked():
        config.model.vocab_size = 512 if smoke else 64010
    devices = jax.devices()[:1] if smoke else jax.devices()
    n = len(devices)
    mesh = parallel.create_mesh({"data": 1, "fsdp": n}, devices)
    s = setup.build(config, total_steps=100, steps_per_epoch=10, mesh=mesh,
                    rules=parallel.rules_for("fsdp"), load_init=False)
    bs, size, text = int(config.data.batch_size), int(config.data.image_size), \
        int(config.data.max_text_len)
    rng = np.random.default_rng(0)
    batch = {k: np.asarray(v) for k, v in s.task.dummy_batch(config, bs).items()}
    batch.update(image=rng.standard_normal((bs, size, size, 3)).astype(np.float32),
                 text_ids=rng.integers(3, 500, (bs, text)).astype(np.int32),
                 box=np.tile(np.array([[0.5, 0.5, 0.3, 0.3]], np.float32), (bs, 1)),
                 valid=np.ones(bs, np.int32))
    state = s.state
    with s.activate():
        gbatch = s.global_batch(batch)
        holder = {"state": state}

        def run():
            holder["state"], m = s.train_step(holder["state"], gbatch)
            return m["loss"]

        secs = _median_time(run, 1 if smoke else 2, 1 if smoke else 5)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {"case": f"oneref {'tiny' if smoke else 'base'} REC+RES train step ({size} px, "
                    f"batch {bs}, {n} device(s), fsdp, bf16)", "step_s": secs,
            "examples_per_s": bs / secs, "peak_gib": None if peak is None else peak / 2**30}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--demo_flops", action="store_true",
                   help="only print the demo model's analytic FLOPs per example and exit")
    a = p.parse_args(argv)
    if a.demo_flops:
        print(f"demo model: {demo_flops() / 1e9:.3f} GFLOP per example (fwd+bwd, encoder)")
        return 0
    import jax

    t0 = time.time()
    rows = [beit3_mfu(a.smoke, None)]
    if jax.devices()[0].platform == "gpu" or a.smoke:
        rows.append(beit3_mfu(a.smoke, "einsum"))
    rows.append(oneref_steps(a.smoke))
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; "
          f"jax {jax.__version__}; {time.time() - t0:.0f} s")
    for r in rows:
        cells = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in r.items() if k != "case")
        print(f"  {r['case']}: {cells}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
