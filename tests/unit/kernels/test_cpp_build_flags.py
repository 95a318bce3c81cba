"""The C++ kernel libraries target the machine at hand unless KVYARD_CPU_MARCH names a CPU class
(benchmarks of AVX2-only code paths on a newer CPU); the flags are part of the build's cache key,
so the two builds never replace each other."""
from __future__ import annotations

from pathlib import Path

from kvyard.kernels.cpp_build import CppLibrary, _build_key

LIB = CppLibrary(name="flags_probe", sources=(Path(__file__),))


def test_native_build_targets_this_machine(monkeypatch):
    monkeypatch.delenv("KVYARD_CPU_MARCH", raising=False)
    assert LIB.flags(native=True)[-1] == "-march=native"
    assert not any(f.startswith("-march") for f in LIB.flags(native=False))


def test_cpu_march_names_another_cpu_class_and_its_own_cache_entry(monkeypatch):
    monkeypatch.delenv("KVYARD_CPU_MARCH", raising=False)
    native = LIB.flags(native=True)
    monkeypatch.setenv("KVYARD_CPU_MARCH", "x86-64-v3")
    v3 = LIB.flags(native=True)
    assert v3[-1] == "-march=x86-64-v3" and "-march=native" not in v3
    assert _build_key(LIB, "g++", native) != _build_key(LIB, "g++", v3)
