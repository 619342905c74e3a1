"""benchmarks/scaling.py --quick runs end to end on real pinned processes,
so the benchmark cannot rot: every row is there, every number finite and
positive, and the pipelined loss equals the unpipelined one."""

import importlib.util
import math
import os
import pathlib
import subprocess
import sys

import reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


_tables = reference.markdown_tables


def _positive(cell: str) -> bool:
  value = float(cell.replace(",", ""))
  return math.isfinite(value) and value > 0


def test_quick_scaling_benchmark_prints_both_tables():
  with_torch = importlib.util.find_spec("torch") is not None
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--quick"],
                        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=1800)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-3000:]
  tables = _tables(proc.stdout)

  pipeline = tables["schedule"]
  assert [(r["schedule"], r["M"], r["microbatch"]) for r in pipeline] == [
      ("1f1b", "4", "64"), ("interleaved v=2", "4", "64")], out
  for row in pipeline:
    for column, cell in row.items():
      if column not in ("schedule", "loss diff"):
        assert _positive(cell), (column, row)
    assert float(row["loss diff"]) <= 1e-4, row
    assert abs(float(row["theory x eff"]) - float(row["theory S(1-bubble)"])
               * float(row["mb-efficiency"])) < 0.02, row
    # the lockstep rounds timed with each stage's measured op costs
    rounds_ms = float(row["rounds at op costs ms"])
    # (from cells rounded to 0.1 ms: a quick run's steps are a few ms)
    slack = 0.06 / rounds_ms
    theory = float(row["ms/step 1 proc"]) / rounds_ms
    assert abs(float(row["theory at op costs"]) - theory) <= 0.01 + 2 * slack * theory, row
    ratio = rounds_ms / float(row["ms/step 2 proc"])
    assert abs(float(row["measured / theory at op costs"]) - ratio) <= 0.01 + 2 * slack * ratio, row
  # one line of op costs per microbatch count and stage count (v = 1 and 2)
  notes = [line for line in proc.stdout.splitlines() if line.startswith("- M=4")]
  assert [note.split(":")[0] for note in notes] == ["- M=4, 2 stages", "- M=4, 4 stages"], out
  for note in notes:
    assert "F/0" in note and "BW/1" in note and "B/0 0.0" in note, note

  dp = tables["global batch"]
  assert [r["global batch"] for r in dp] == ["256"], out
  for row in dp:
    for column, cell in row.items():
      if with_torch or "torch" not in column:
        assert _positive(cell), (column, row)
      else:
        assert cell == "-", (column, row)
