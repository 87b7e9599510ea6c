"""Worker of ``test_distributed.py``: two OneRef train steps, then an eval with metric all-reduce.

``python tests/dist_worker.py PROCESS_ID PORT OUT_PATH [NUM_PROCESSES]``

With ``NUM_PROCESSES`` 2 (the default) this is one of two ``jax.distributed`` processes on
127.0.0.1:PORT, each with 2 CPU devices; with 1 it is the single-process reference on the 4
devices given by ``XLA_FLAGS``. Either way the mesh is ``fsdp=4`` over the 4 devices (fsdp
layout: parameters sharded across both processes), each process feeds its share of the global
batches through ``parallel.host_batch_to_global``, and ``OUT_PATH`` (npz) receives the losses,
the full parameters (``var/<path>``), the per-sample eval rows of this process (``eval/<key>``)
and the metric sums before (``local/<field>``) and after (``reduced/<field>``) the all-reduce.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = {"data": 1, "fsdp": 4}
KINDS = ("0", "1", "2")


def main(process_id: int, port: int, out_path: str, num_processes: int = 2) -> None:
    """Run the worker; raises on any check that fails (so the exit status is non-zero)."""
    start = time.monotonic()

    def log(what: str) -> None:
        print(f"[worker {process_id}/{num_processes}] {what} at {time.monotonic() - start:.1f} s",
              flush=True)

    import jax

    if num_processes > 1:
        jax.config.update("jax_num_cpu_devices", 2)
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=60,
        )
    log("initialized")
    from jax.experimental import multihost_utils

    from refjax import parallel
    from refjax.evaluate.metrics import MetricAccumulator, allreduce_sums
    from tests.oneref_train_util import flat_variables, local_slice, make_batch, run_train_steps

    if jax.process_count() != num_processes or jax.process_index() != process_id % num_processes:
        raise RuntimeError(f"process {jax.process_index()}/{jax.process_count()}, expected "
                           f"{process_id}/{num_processes}")
    if len(jax.devices()) != 4 or len(jax.local_devices()) != 4 // num_processes:
        raise RuntimeError(f"devices {jax.devices()}, local {jax.local_devices()}")

    pid, n = jax.process_index(), jax.process_count()
    batches = [local_slice(make_batch(step), pid, n) for step in range(2)]
    eval_batch = local_slice(make_batch(100), pid, n)
    log("imported")
    out = run_train_steps(MESH, "fsdp", jax.devices(), batches, eval_batch=eval_batch)
    log("trained and evaluated")
    params = out["state"].params
    parallel.assert_params_sharded(params, min_bytes=16 * 1024)
    kernel = params["beit3"]["text_embed"]["embedding"]
    spans = {d.process_index for d in kernel.sharding.device_set}
    if spans != set(range(n)) or kernel.sharding.is_fully_replicated:
        raise RuntimeError(f"text_embed is not sharded over every process: {kernel.sharding}")

    rows = out["eval"]
    acc = MetricAccumulator(kinds=KINDS)
    acc.update(rows, kinds=[str(k) for k in rows["kind"]], valid=rows["valid"])
    reduced = acc.allreduce()
    rows_total = allreduce_sums({"rows": np.float64(len(rows["valid"]))})["rows"]

    result: dict[str, np.ndarray] = {
        "process_count": np.int64(n),
        "process_index": np.int64(pid),
        "losses": np.asarray(out["losses"], np.float64),
        "rows_total": np.float64(rows_total),
    }
    result.update({f"var/{k}": v for k, v in flat_variables(out["state"]).items()})
    result.update({f"eval/{k}": np.asarray(v) for k, v in rows.items()})
    for prefix, accumulator in (("local", acc), ("reduced", reduced)):
        for group, sums in accumulator.state().items():
            result.update({f"{prefix}/{group}/{f}": np.float64(v) for f, v in sums.items()})
        result.update({f"{prefix}/result/{k}": np.float64(v)
                       for k, v in accumulator.result().items()})
    np.savez(out_path, **result)
    log("saved")
    if n > 1:
        multihost_utils.sync_global_devices("dist_worker done")
        jax.distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    args = sys.argv[1:]
    main(int(args[0]), int(args[1]), args[2], int(args[3]) if len(args) > 3 else 2)
