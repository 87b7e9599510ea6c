"""What the experiment drivers share: the refjax CLI run as a child process (this repository on
its ``PYTHONPATH``, optionally pinned to one core, its CPU seconds measured), ``--set``
overrides passed through, and the arms' ``OUT/<arm>/result.json`` read back.

Scripts import it as ``experiments.driver`` after putting the repository root on ``sys.path``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from collections.abc import Iterable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment with the repository first on ``PYTHONPATH`` (kept, not
    replaced: carried packages may sit there), without ``XLA_FLAGS`` (a caller's fake device
    count must not leak into a one-core run), plus ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


def set_args(items: Iterable[str]) -> list[str]:
    """``["--set", item, ...]`` for the CLI."""
    out: list[str] = []
    for s in items:
        out += ["--set", s]
    return out


def add_set_argument(p: argparse.ArgumentParser) -> None:
    """The drivers' repeatable ``--set KEY=VALUE`` (appended to every run's overrides)."""
    p.add_argument("--set", action="append", default=[],
                   help="extra KEY=VALUE override for every run (e.g. data.num_workers=2)")


def run_cli(args: list[str], log: str, core: int | None = None) -> float:
    """Run ``python -m refjax ARGS`` (pinned to ``core`` when given) with its output in
    ``log``; raises on failure; returns the child's CPU seconds (``getrusage``)."""
    cmd = [sys.executable, "-m", "refjax", *args]
    if core is not None:
        cmd = ["taskset", "-c", str(core), *cmd]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as f:
        subprocess.run(cmd, cwd=ROOT, env=child_env(), stdout=f, stderr=subprocess.STDOUT,
                       check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def load_results(out: str, arms: Iterable[str]) -> dict[str, dict]:
    """``{arm: OUT/<arm>/result.json}`` for the arms (in that order) that finished."""
    res = {}
    for arm in arms:
        path = os.path.join(out, arm, "result.json")
        if os.path.exists(path):
            with open(path) as f:
                res[arm] = json.load(f)
    return res
