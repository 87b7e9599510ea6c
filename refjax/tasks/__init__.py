"""The task registry: ``get_task(name)`` from a name -> module table (imported lazily).

A new task is a module defining a ``Task`` subclass (``refjax.tasks.base``) plus a line here, or
``register_task(name, factory)`` from anywhere (a test, a notebook, a plug-in) without editing this
package.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from refjax.tasks.base import Accumulator, Task

__all__ = ["Accumulator", "Task", "get_task", "register_task", "task_names"]

# name -> "module:attribute"; the attribute is a Task subclass or a zero-argument factory.
_BUILTIN: dict[str, str] = {
    "rec": "refjax.tasks.oneref:RecTask",
    "res": "refjax.tasks.oneref:ResTask",
    "mrefm": "refjax.tasks.mrefm:MRefMTask",
    "ras": "refjax.tasks.ras:RASTask",
}
_REGISTERED: dict[str, Callable[[], Task]] = {}


def register_task(name: str, factory: Callable[[], Task], *, replace: bool = False) -> None:
    """Make ``get_task(name)`` return ``factory()`` (a Task subclass or a function)."""
    if not replace and (name in _REGISTERED or name in _BUILTIN):
        raise ValueError(f"task {name!r} is already registered")
    _REGISTERED[name] = factory


def task_names() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTERED))


def get_task(name: str) -> Task:
    """The task registered as ``name`` (a new instance)."""
    if name in _REGISTERED:
        return _REGISTERED[name]()
    if name not in _BUILTIN:
        raise ValueError(f"unknown task {name!r}; registered tasks: {task_names()}")
    module, _, attr = _BUILTIN[name].partition(":")
    return getattr(importlib.import_module(module), attr)()
