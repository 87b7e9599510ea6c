"""A faster malloc for XLA:CPU: find mimalloc and re-run the CLI with it preloaded.

XLA:CPU maps each execution's temporary buffer afresh; under glibc malloc that is an ``mmap``
and hundreds of thousands of page faults per training step. Preloading mimalloc (the
``cmeel-mimalloc`` wheel in requirements.txt) reuses that memory; ``benchmarks/allocator.py``
measures the gain (BENCHMARKS.md). ``python -m refjax`` re-executes itself once with
``LD_PRELOAD`` set when the library is found; ``REFJAX_ALLOCATOR=system`` opts out, and
``REFJAX_ALLOCATOR=/path/lib.so`` preloads another allocator. A library call (``import refjax``)
never changes the allocator: that is the interpreter's business.
"""

from __future__ import annotations

import glob
import os
import sys

ENV = "REFJAX_ALLOCATOR"
_MARK = "REFJAX_ALLOCATOR_ACTIVE"


def find_mimalloc() -> str | None:
    """Path of the mimalloc shared library shipped by ``cmeel-mimalloc``, or None."""
    for root in sys.path:
        hits = sorted(glob.glob(os.path.join(root, "cmeel.prefix", "lib", "libmimalloc.so*")))
        if hits:
            return min(hits, key=len)  # libmimalloc.so (a symlink) before the versioned names
    return None


def preload_library() -> str | None:
    """The allocator ``python -m refjax`` preloads: ``$REFJAX_ALLOCATOR`` (a path, or
    ``system`` for none), else mimalloc when installed."""
    choice = os.environ.get(ENV, "")
    if choice == "system":
        return None
    if choice:
        return choice if os.path.isfile(choice) else None
    return find_mimalloc()


def reexec_with_allocator(argv: list[str]) -> None:
    """Replace this process by ``python -m refjax argv`` with the allocator preloaded (once;
    no-op when it is already loaded, opted out, or not installed)."""
    if os.environ.get(_MARK) or sys.platform != "linux":
        return
    lib = preload_library()
    if not lib or lib in os.environ.get("LD_PRELOAD", ""):
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    env[_MARK] = lib
    os.execve(sys.executable, [sys.executable, "-m", "refjax", *argv], env)
