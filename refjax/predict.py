"""Inference API: load a trained run and ask its task's predictor.

```python
from refjax.predict import Predictor
p = Predictor.from_workdir("runs/demo")      # the task's predictor (OneRef: box + mask)
pred = p.predict(image_uint8_hwc, "the small red circle")
p.draw(image_uint8_hwc, pred, "the small red circle").save("pred.png")
```

``from_workdir`` restores parameters only (plus batch statistics and frozen variables); no
optimizer is built or read. What ``predict`` takes and returns is the task's
(``Task.make_predictor``); for OneRef see ``refjax.tasks.oneref.OneRefPredictor``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from refjax.tasks.oneref import (  # noqa: F401  (re-exported: OneRef's geometry helpers)
    OneRefPredictor,
    canvas_box_to_original,
    letterbox_of,
)


class Predictor:
    """Factory of task predictors: ``Predictor.from_workdir(dir)``."""

    @classmethod
    def from_workdir(cls, workdir: str, step: int | None = None, sets: Sequence[str] = ()) -> Any:
        """The predictor of a training run's task (best checkpoint, else latest, or ``step``);
        ``sets`` override the run's config (e.g. ``data.data_dir=...``)."""
        from refjax.train.trainer import load_for_inference

        task, model, variables, config = load_for_inference(workdir, step=step, sets=sets)
        from refjax.train.state import model_variables

        return task.make_predictor(model, model_variables(variables), config)
