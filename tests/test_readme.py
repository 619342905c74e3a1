"""The README's Python example runs as written (in a fresh process)."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert blocks, "README has no python example"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-c", blocks[0]], capture_output=True,
                        text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  loss = float(proc.stdout.strip().splitlines()[-1])
  assert loss < 1.0  # 100 adam steps on digits from ~2.3


def test_readme_collectives_example_prints_what_it_says():
  block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
               if "from meshnet import collectives" in b)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True,
                        env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  promised = block.strip().splitlines()[-1].split("#")[1].split()
  printed = proc.stdout.replace("[", " [ ").replace("]", " ] ").split()
  assert [float(v) for v in printed if v not in "[]"] == \
      [float(v.strip("[]")) for v in promised if v.strip("[]")]
