"""A faster malloc for XLA:CPU: re-run the CLI with tcmalloc or mimalloc preloaded.

XLA:CPU maps each execution's temporary buffer afresh; under glibc malloc that is an ``mmap``
and hundreds of thousands of page faults per training step. A caching allocator reuses that
memory; ``benchmarks/allocator.py`` measures the gain (BENCHMARKS.md). ``python -m refjax``
re-executes itself once with ``LD_PRELOAD`` set to, in order: ``$REFJAX_ALLOCATOR`` (a path),
the system's tcmalloc (Debian ``libtcmalloc-minimal4``) when installed, else mimalloc from the
``cmeel-mimalloc`` wheel when installed (with page purging off, which is what saves the
page faults). ``REFJAX_ALLOCATOR=system`` opts out. A library call (``import refjax``) never
changes the allocator: that is the interpreter's business.
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


# mimalloc options: keep freed pages (XLA frees and re-allocates its big buffer every step).
MIMALLOC_ENV = {"MIMALLOC_PURGE_DELAY": "-1", "MIMALLOC_ARENA_EAGER_COMMIT": "1"}


def find_tcmalloc() -> str | None:
    """The system's tcmalloc (Debian ``libtcmalloc-minimal4``), or None."""
    hits = sorted(glob.glob("/usr/lib/*/libtcmalloc_minimal.so.4")) + sorted(
        glob.glob("/usr/lib/libtcmalloc_minimal.so.4"))
    return hits[0] if hits else None


def preload_library() -> str | None:
    """The allocator ``python -m refjax`` preloads (module docstring), or None."""
    choice = os.environ.get(ENV, "")
    if choice == "system":
        return None
    if choice:
        return choice if os.path.isfile(choice) else None
    return find_tcmalloc() or find_mimalloc()


def reexec_with_allocator(argv: list[str]) -> None:
    """Replace this process by ``python -m refjax argv`` with the allocator preloaded (once;
    no-op when it is already loaded, opted out, or not installed)."""
    if os.environ.get(_MARK) or sys.platform != "linux":
        return
    lib = preload_library()
    if not lib or lib in os.environ.get("LD_PRELOAD", ""):
        return
    env = dict(os.environ)
    if "mimalloc" in os.path.basename(lib):
        env = {**MIMALLOC_ENV, **env}
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    env[_MARK] = lib
    os.execve(sys.executable, [sys.executable, "-m", "refjax", *argv], env)
