"""Prints one table from the JUnit XML files that tests/gpu/run_all.sh writes.

    python tests/gpu/summarize.py OUT_DIR      (reads OUT_DIR/*.xml; exit 1 if anything failed)

A row per (suite, plugin): the suite is the XML file's name, the plugin the attention backend
named in the test id (or the test function when none is).
"""
from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

PLUGINS = ("hybrid", "flashinfer", "flex_attention", "triton", "torch_native")


def plugin_of(name: str) -> str:
    params = name.partition("[")[2]
    for plugin in PLUGINS:
        if plugin in params:
            return plugin + ("-no-graphs" if "no-graphs" in params else "")
    return name.partition("[")[0].removeprefix("test_")[:28]


def main(out_dir: str) -> int:
    rows: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0, 0, 0.0])   # passed, failed, skipped, s
    failures = []
    files = sorted(Path(out_dir).glob("*.xml"))
    for path in files:
        for case in ET.parse(path).getroot().iter("testcase"):
            row = rows[(path.stem, plugin_of(case.get("name", "")))]
            row[3] += float(case.get("time", 0) or 0)
            if case.find("failure") is not None or case.find("error") is not None:
                row[1] += 1
                failures.append(f"{path.stem}: {case.get('classname')}::{case.get('name')}")
            elif case.find("skipped") is not None:
                row[2] += 1
            else:
                row[0] += 1
    print(f"{'suite':<14} {'plugin / case':<30} {'passed':>6} {'failed':>6} {'skipped':>7} {'seconds':>8}")
    for (suite, plugin), (ok, bad, skip, secs) in sorted(rows.items()):
        print(f"{suite:<14} {plugin:<30} {ok:>6} {bad:>6} {skip:>7} {secs:>8.1f}")
    if not files:
        print("(no results)")
    for line in failures:
        print("FAILED", line)
    return 1 if failures or not files else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/kvyard_gpu"))
