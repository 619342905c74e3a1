"""benchmarks/plan_vs_measured.py --quick runs end to end on real pinned
processes: a row per configuration, the plan's and the measured times
positive, and each relative error printed."""

import math
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quick_forecast_against_measured():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "plan_vs_measured.py"), "--quick"],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  lines = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
  rows = [[c.strip() for c in line.strip("|").split("|")]
          for line in lines[2:]]  # after the header and its --- line
  assert [row[0] for row in rows] == [
      "data=2, batch 256", "stage=2 1f1b M=4, batch 512"], proc.stdout
  for row in rows:
    cells = row[1:]
    numbers = [float(c) for c in cells if not c.endswith("%")]
    errors = [c for c in cells if c.endswith("%")]
    assert len(numbers) == 6 and all(math.isfinite(v) and v > 0 for v in numbers), row
    assert len(errors) == 3 and all(re.fullmatch(r"[+-]\d+%", e) for e in errors), row
