"""The task-agnostic evaluator: jitted eval steps over a split, reduced by the task's accumulator.

Results are flat dicts, the same shape from the accumulator to ``metrics.json``:
``{"acc@0.5": .., "miou": .., "count": .., "<kind>/<metric>": ..}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax

from refjax import parallel
from refjax.data.pipeline import make_pipeline
from refjax.tasks import Task
from refjax.train.steps import EvalStep, local_rows


def evaluate_batches(
    task: Task,
    config: Any,
    eval_step: EvalStep,
    variables: Mapping[str, Any],
    batches: Iterable[Mapping[str, Any]],
    mesh: jax.sharding.Mesh,
) -> dict[str, float]:
    """Metrics of ``variables`` over this process's host ``batches``, reduced over all
    processes. Call under the mesh and rules context."""
    acc = task.make_accumulator(config)
    for batch in batches:
        out = eval_step(variables, parallel.host_batch_to_global(dict(batch), mesh))
        acc.update({k: local_rows(v) for k, v in out.items()})
    return acc.allreduce().result()


def evaluate_split(
    task: Task,
    config: Any,
    eval_step: EvalStep,
    variables: Mapping[str, Any],
    split: str,
    mesh: jax.sharding.Mesh,
    max_batches: int = 0,
) -> dict[str, float]:
    """Metrics of ``variables`` on ``split`` (every expression once over all processes;
    ``max_batches`` > 0 stops early). Call under the mesh and rules context."""
    data_task = task.data_task(config)
    with make_pipeline(config.data, split, task=data_task, train=False, seed=0) as it:
        n = it.num_batches if not max_batches else min(max_batches, it.num_batches or 0)
        batches = (b for _, b in zip(range(n), it))
        return evaluate_batches(task, config, eval_step, variables, batches, mesh)
