"""Builds and loads the GGUF CPU kernels (gguf_kernels.cpp) at first use.

The shared library is compiled with ``-march=native`` for the machine at hand, so it is cached
per (source, flags, torch, compiler, CPU) key outside the repository:
``$KVYARD_CACHE_DIR`` or ``$XDG_CACHE_HOME/kvyard`` or ``~/.cache/kvyard``, under
``gguf_kernels/<key>/``. Only the few ATen/c10 headers the kernels need are included, so a build
from scratch takes about ten seconds. Concurrent processes (one per tensor-parallel rank) take a
file lock, and the library is moved into place atomically.

KVYARD_GGUF_PORTABLE=1 builds without -march=native: the portable C++ kernels instead of the
AVX2 ones (for tests, and for CPUs without AVX2/FMA/F16C, where the native build picks them too).
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gguf_kernels.cpp")
HEADERS = [Path(__file__).with_name("gguf_formats.h")]
LIBRARY_NAME = "kvyard_gguf.so"
# -ffp-contract=off keeps dequantization bit-identical to gguf.quants (no fused q*scale+min).
BASE_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared", "-std=c++20"]
NATIVE_FLAGS = ["-march=native"]

_loaded: Optional[Path] = None


class KernelBuildError(RuntimeError):
    """The GGUF kernels could not be compiled or loaded on this machine."""


def cache_root() -> Path:
    if os.environ.get("KVYARD_CACHE_DIR"):
        return Path(os.environ["KVYARD_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kvyard"


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    raise KernelBuildError("no C++ compiler found (set CXX, or install g++)")


def _cpu_identity() -> str:
    """The CPU's model and feature flags: -march=native code is only valid on an equal CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _torch_flags() -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    lib_dirs = library_paths()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return ([f"-I{p}" for p in include_paths()] + [f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
            + [f"-L{p}" for p in lib_dirs] + [f"-Wl,-rpath,{p}" for p in lib_dirs]
            + ["-lc10", "-ltorch_cpu"])


def _build_key(compiler: str, flags: list[str]) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256()
    for part in (SOURCE.read_text(), *(h.read_text() for h in HEADERS), " ".join(flags), torch.__version__, version,
                 _cpu_identity(), sys.platform):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _compile(compiler: str, flags: list[str], target: Path) -> None:
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    cmd = [compiler, *flags, f"-I{SOURCE.parent}", str(SOURCE), "-o", str(tmp), *_torch_flags()]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise KernelBuildError(f"compiling {SOURCE.name} failed:\n{proc.stderr[-4000:]}")
    os.replace(tmp, target)


def build(native: bool = True) -> Path:
    """The path of the compiled library, compiling it if this machine has no cached build."""
    compiler = _compiler()
    flags = BASE_FLAGS + (NATIVE_FLAGS if native else [])
    key = _build_key(compiler, flags)
    directory = cache_root() / "gguf_kernels" / key
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:   # read-only home (some CI sandboxes): a per-user temp folder instead
        directory = Path(tempfile.gettempdir()) / f"kvyard-{os.getuid()}" / "gguf_kernels" / key
        directory.mkdir(parents=True, exist_ok=True)
    target = directory / LIBRARY_NAME
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            logger.info("building GGUF CPU kernels into %s", directory)
            _compile(compiler, flags, target)
    return target


def load() -> Path:
    """Compiles (once per machine) and loads the kernels into torch.ops.kvyard_gguf."""
    global _loaded
    if _loaded is not None:
        return _loaded
    if os.environ.get("KVYARD_GGUF_PORTABLE", "") in ("1", "true"):
        path = build(native=False)     # the portable C++ kernels (tests run them this way)
    else:
        path = _build_native_or_portable()
    torch.ops.load_library(str(path))
    _loaded = path
    return path


def _build_native_or_portable() -> Path:
    try:
        return build(native=True)
    except KernelBuildError as exc:  # e.g. a compiler without -march=native: portable build
        logger.warning("native build of the GGUF kernels failed, trying a portable one: %s", exc)
        return build(native=False)
