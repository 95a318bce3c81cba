"""`import kvyard` sets libgomp's wait policy before torch loads: brief spinning, then sleep;
values the user set win, and a user's own policy keeps libgomp's spin count for it."""
import os
import subprocess
import sys

import pytest

_PROBE = "import os, kvyard; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"


def _probe(**env_overrides) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_overrides)
    return subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("overrides, expected", [
    ({}, "PASSIVE 3000"),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE None"),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, "PASSIVE None"),
    ({"GOMP_SPINCOUNT": "0"}, "PASSIVE 0"),
])
def test_openmp_wait_defaults(overrides, expected):
    assert _probe(**overrides) == expected
