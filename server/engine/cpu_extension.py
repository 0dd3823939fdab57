"""Compiling the engine's C++ CPU kernels: on first use, for the host CPU, cached on disk.

Each kernel module (`lora_cpu`, `nf4_cpu`) hands its source here. The build is keyed by the source,
the CPU's flags and the torch version and folder, so a machine with other CPU features (AVX2 only vs
AVX-512 / AMX) or another torch (or virtualenv) builds its own copy, compiled with `-march=native`:
the kernels pick their vector path at compile time from what that CPU has (`__AVX512F__`, `__AVX2__`,
or plain C++).
When nothing compiles (no compiler, no ninja) the build returns None and the caller falls back.

Where the builds are cached is the caller's to say: the serving process passes its folder in
(`set_build_root`, from $LORAPLEX_HOME) before it builds an engine; without one, builds go under
`$LORAPLEX_HOME/torch_extensions` when that variable is set, else into torch's default extensions folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

#: Set (to anything) to skip every compiled CPU kernel, as on a machine without a compiler.
DISABLE_ENV = "LORAPLEX_DISABLE_CPU_KERNEL"
HOME_ENV = "LORAPLEX_HOME"
#: The advisory lock loraplex builds hold, and torch's own lock file (torch.utils.file_baton), in a build folder.
BUILD_LOCK, TORCH_LOCK = "loraplex-build.lock", "lock"

_build_root: Path | None = None


def set_build_root(folder: Path) -> None:
    """Cache every later build under `folder` (one subfolder per kernel, source, CPU and torch version)."""
    global _build_root
    _build_root = folder


def build_root() -> Path:
    """The folder builds are cached under: the one set, else $LORAPLEX_HOME/torch_extensions, else torch's."""
    if _build_root is not None:
        return _build_root
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]) / "torch_extensions"
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


VECTORS_HEADER = Path(__file__).with_name("cpu_vectors.h")
"""The vector type and operations every kernel shares (`with_vectors`)."""


LORA_TILES = Path(__file__).with_name("lora_tiles.h")
"""The multi-LoRA op's tiles, which the LoRA kernel and the fused NF4 kernel share."""


def with_vectors(source: str, *headers: Path) -> str:
    """A kernel's C++ `source` with cpu_vectors.h's text ahead of it, then the texts of `headers`: one copy of the
    helpers the kernels share, compiled with each (and part of each build's key, so a change to one rebuilds the
    kernels that include it)."""
    return "".join(header.read_text() for header in (VECTORS_HEADER, *headers)) + source


def cpu_flags() -> str:
    """The host CPU's feature flags as /proc/cpuinfo lists them ("" where there is no such file)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return ""
    return next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")


def build_folder(name: str, source: str, cflags: list[str]) -> Path:
    """The folder a build of `name` from `source` with `cflags` is cached in."""
    # torch's folder too: two environments with the same torch release build against their own headers and
    # libraries, and sharing one build folder would make each rebuild over the other's copy
    identity = source + cpu_flags() + torch.__version__ + str(Path(torch.__file__).parent) + " ".join(cflags)
    return build_root() / f"{name}_{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def _cflags(extra_cflags: tuple[str, ...]) -> list[str]:
    return ["-O3", "-march=native", "-fopenmp", *extra_cflags]


def folder_of(name: str, source: str, extra_cflags: tuple[str, ...] = ()) -> Path:
    """The folder `build(name, source, extra_cflags)` caches its build in (where facts measured on that build,
    for this CPU, may be kept too)."""
    return build_folder(name, source, _cflags(extra_cflags))


def build(name: str, source: str, extra_cflags: tuple[str, ...] = ()) -> ModuleType | None:
    """The compiled extension `name` built from C++ `source`, or None (logged) when it cannot be built.

    Processes building the same kernel at once wait for each other on an advisory lock of the build folder
    (`flock`, let go by the kernel when its holder dies), not on torch's lock file alone: a build killed
    midway leaves that file behind, and torch would wait for it forever. Whoever holds the flock removes
    such a leftover before building."""
    if os.environ.get(DISABLE_ENV):
        return None
    cflags = _cflags(extra_cflags)
    folder = build_folder(name, source, cflags)
    try:
        from torch.utils.cpp_extension import load_inline

        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / BUILD_LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            (folder / TORCH_LOCK).unlink(missing_ok=True)  # only a killed build leaves it while we hold the flock
            return load_inline(name=f"loraplex_{name}", cpp_sources=[source], build_directory=str(folder),
                               extra_cflags=cflags, verbose=False)
    except Exception as error:  # no compiler, no ninja, unsupported platform: fall back, loudly
        log.warning("CPU kernel %s unavailable (%s); using the portable torch path", name, error)
        return None
