"""The cluster examples are valid shell and use only flags meshnet has."""

import re
import shlex
import subprocess
from pathlib import Path

from meshnet import cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _train_commands(text: str) -> list[list[str]]:
  code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
  joined = re.sub(r"\\\n\s*", " ", code)
  commands = []
  for match in re.finditer(r"meshnet train([^'\n]*)", joined):
    args = shlex.split(match.group(1).replace('"$HOME', '"/home/u').replace(
        "$SLURM_JOB_ID", "1"))
    commands.append(["train", *args])
  return commands


def test_examples_parse_and_use_real_flags():
  scripts = sorted(EXAMPLES.glob("*.s*"))
  assert {p.name for p in scripts} == {"slurm_gpu.sbatch", "tpu_pod.sh"}
  for script in scripts:
    subprocess.run(["bash", "-n", str(script)], check=True)
    commands = _train_commands(script.read_text())
    assert commands, script.name
    for argv in commands:
      config = cli.config_from_args(cli.build_parser().parse_args(argv))
      assert config.checkpoint.dir  # both examples checkpoint their runs
