"""Builds and loads a plugin's C++ CPU kernels (a torch op library) at first use.

A library is compiled with ``-march=native`` for the machine at hand (``KVYARD_CPU_MARCH=<arch>``,
e.g. ``x86-64-v3``, targets an older CPU class instead: benchmarks of AVX2-only code paths on a
newer machine), so it is cached per
(sources, flags, torch, compiler, CPU) key outside the repository: ``$KVYARD_CACHE_DIR`` or
``$XDG_CACHE_HOME/kvyard`` or ``~/.cache/kvyard``, under ``<name>/<key>/``. Sources include only
the few ATen/c10 headers they need, so a build takes seconds. Concurrent processes (one per
tensor-parallel rank) take a file lock, and the library is moved into place atomically.

Used by plugins (the GGUF matmul kernels, the CPU attention kernels): each names its sources and
calls ``load_library``; the ops then live under ``torch.ops.<namespace>``.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

logger = logging.getLogger(__name__)

BASE_FLAGS = ("-O3", "-fopenmp", "-fPIC", "-shared", "-std=c++20")
# Headers every library may include (their folder is on every include path, their text in every
# build key): small SIMD helpers shared by core and plugin kernels, and the native C ABI between
# the C++ decode step and the plugins' kernels.
COMMON_HEADERS = tuple(Path(__file__).with_name("csrc") / h for h in ("kvyard_simd.h", "kvyard_native.h"))
NATIVE_FLAGS = ("-march=native",)


def native_flags() -> tuple[str, ...]:
    march = os.environ.get("KVYARD_CPU_MARCH", "").strip()
    return (f"-march={march}",) if march else NATIVE_FLAGS


class KernelBuildError(RuntimeError):
    """C++ kernels could not be compiled or loaded on this machine."""


@dataclass(frozen=True)
class CppLibrary:
    """One shared library: ``sources`` compiled together (``headers`` only feed the cache key;
    their folders are on the include path)."""
    name: str                          # cache folder and .so name
    sources: tuple[Path, ...]
    headers: tuple[Path, ...] = ()
    extra_flags: tuple[str, ...] = ()  # beside BASE_FLAGS

    def flags(self, native: bool) -> list[str]:
        return [*BASE_FLAGS, *self.extra_flags, *(native_flags() if native else ())]


def cache_root() -> Path:
    if os.environ.get("KVYARD_CACHE_DIR"):
        return Path(os.environ["KVYARD_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kvyard"


def build(lib: CppLibrary, native: bool = True) -> Path:
    """The path of the compiled library, compiling it if this machine has no cached build."""
    compiler = _compiler()
    flags = lib.flags(native)
    key = _build_key(lib, compiler, flags)
    directory = cache_root() / lib.name / key
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:   # read-only home (some CI sandboxes): a per-user temp folder instead
        directory = Path(tempfile.gettempdir()) / f"kvyard-{os.getuid()}" / lib.name / key
        directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{lib.name}.so"
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            logger.info("building %s into %s", lib.name, directory)
            _compile(lib, compiler, flags, target)
    return target


def load_library(lib: CppLibrary, native: bool = True) -> Path:
    """Builds (once per machine) and loads the library. With native=True a failed native build
    (e.g. a compiler without -march=native) falls back to a portable one."""
    try:
        path = build(lib, native=native)
    except KernelBuildError as exc:
        if not native:
            raise
        logger.warning("native build of %s failed, trying a portable one: %s", lib.name, exc)
        path = build(lib, native=False)
    torch.ops.load_library(str(path))
    return path


class OptionalLibrary:
    """A C++ library behind an optional fast path: built and loaded at the first ``available()``,
    which then registers its ops' fake (shape) functions for torch.compile. Where it cannot be
    built or loaded (no compiler, an incompatible toolchain) or ``disable_env`` is "0"/"false",
    ``available()`` is False (with one warning for a failure) and the caller keeps its torch code."""

    def __init__(self, lib: CppLibrary, what: str, register_fakes: Callable[[], None],
                 disable_env: Optional[str] = None):
        self.lib, self.what, self.disable_env = lib, what, disable_env
        self._register_fakes = register_fakes
        self._ok: Optional[bool] = None

    def available(self) -> bool:
        if self._ok is None:
            self._ok = self._load()
        return self._ok

    def _load(self) -> bool:
        if self.disable_env and os.environ.get(self.disable_env, "1") in ("0", "false"):
            return False
        try:
            load_library(self.lib)
        except Exception as exc:
            logger.warning("%s unavailable, using the torch path: %s", self.what, exc)
            return False
        self._register_fakes()
        return True


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


def _build_key(lib: CppLibrary, compiler: str, flags: list[str]) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256()
    for part in (*(p.read_text() for p in (*lib.sources, *lib.headers, *COMMON_HEADERS)), " ".join(flags),
                 torch.__version__, version, _cpu_identity(), sys.platform):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _compile(lib: CppLibrary, compiler: str, flags: list[str], target: Path) -> None:
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    includes = sorted({f"-I{p.parent}" for p in (*lib.sources, *lib.headers, *COMMON_HEADERS)})
    cmd = [compiler, *flags, *includes, *map(str, lib.sources), "-o", str(tmp), *_torch_flags()]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        names = ", ".join(p.name for p in lib.sources)
        raise KernelBuildError(f"compiling {names} failed:\n{proc.stderr[-4000:]}")
    os.replace(tmp, target)
