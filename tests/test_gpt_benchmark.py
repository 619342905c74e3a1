"""benchmarks/gpt.py --quick runs end to end: both tables' rows are there,
every number parses and is positive, and meshnet's step and the plain
``jax.jit`` step start from the same loss (they train the same model)."""

import math
import os
import pathlib
import subprocess
import sys

import reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
MESHES = ["data=8", "fsdp=8", "data=2,fsdp=2,tensor=2", "fsdp=2,stage=4 (1f1b, M=4)"]


_tables = reference.markdown_tables


def _number(cell: str) -> float:
  value = float(cell.replace(",", ""))
  assert math.isfinite(value) and value > 0, cell
  return value


def test_quick_gpt_benchmark_prints_both_tables():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpt.py"), "--quick"],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-3000:]
  tables = _tables(proc.stdout)

  steps = tables["step"]
  assert [r["step"] for r in steps] == ["jax.jit", "meshnet"], out
  values = {r["step"]: {k: _number(v) for k, v in r.items() if k != "step"} for r in steps}
  assert values["jax.jit"]["vs jax.jit"] == 1.0
  # The ratio is of the unrounded times; the ms columns are rounded to 0.1 ms,
  # which at --quick's few milliseconds moves their quotient by a few percent.
  ms, base = values["meshnet"]["ms/step"], values["jax.jit"]["ms/step"]
  rounding = 0.05 / ms + 0.05 / base
  assert math.isclose(values["meshnet"]["vs jax.jit"], ms / base, rel_tol=rounding + 0.01)
  assert math.isclose(values["meshnet"]["loss after 1 step"],
                      values["jax.jit"]["loss after 1 step"], rel_tol=1e-4)

  meshes = tables["mesh"]
  assert [r["mesh"] for r in meshes] == MESHES, out
  rows = {r["mesh"]: {k: _number(v) for k, v in r.items() if k != "mesh"} for r in meshes}
  assert rows["data=8"]["params + opt vs data=8"] == 1.0
  # ZeRO-3 and the fsdp x stage pipeline hold an eighth of the replicated state.
  for name in ("fsdp=8", MESHES[-1]):
    assert rows[name]["params + opt vs data=8"] <= 0.13, rows[name]
  assert rows["data=8"]["optimizer state"] == 2 * rows["data=8"]["params"]  # Adam: mu, nu
