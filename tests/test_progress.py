"""Progress bars: in place on a terminal (a real pty), occasional lines elsewhere."""

import io
import os
import select
import subprocess
import sys
import time

import jax
import numpy as np

import meshnet
from meshnet.metrics import Bar, Progress
from meshnet.step import make_eval_step
from meshnet.train import evaluate

ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


class _Terminal:
  """A pseudo-terminal: ``stream`` writes to it, :meth:`read` returns what a
  terminal received (the line discipline turns ``\\n`` into ``\\r\\n``)."""

  def __init__(self):
    self.master, slave = os.openpty()
    self.stream = open(slave, "w", buffering=1)

  def read(self) -> str:
    self.stream.flush()
    out = b""
    while select.select([self.master], [], [], 0.2)[0]:
      out += os.read(self.master, 65536)
    return out.decode().replace("\r\n", "\n")

  def close(self):
    self.stream.close()
    os.close(self.master)


def test_a_bar_redraws_in_place_on_a_terminal_and_erases_itself():
  term = _Terminal()
  try:
    bar = Bar(3, label="eval", stream=term.stream)
    for _ in range(3):
      bar.advance()
    bar.close(clear=True)
    bar.message("eval @ step 10: loss 0.5")
    out = term.read()
  finally:
    term.close()
  frames = out.split("\r")
  assert frames[1].startswith("eval 1/3 [########----------------] ETA ")
  assert frames[3].startswith("eval 3/3 [########################] ETA 0:00:00")
  assert "\n" not in "".join(frames[:4])  # one line, redrawn
  assert out.endswith("\r\x1b[Keval @ step 10: loss 0.5\n")  # erased, then the message


def test_the_training_line_stays_above_an_evaluation_bar():
  term = _Terminal()
  try:
    progress = Progress(20, stream=term.stream)
    progress.update(10, loss=0.5, samples_per_sec=1000, seconds_per_step=0.1)
    bar = Bar(2, label="eval", stream=term.stream)
    bar.advance()
    bar.advance()
    bar.close(clear=True)
    progress.message("eval @ step 10: loss 0.4")
    progress.update(20, loss=0.3, samples_per_sec=1000, seconds_per_step=0.1)
    progress.close()
    out = term.read()
  finally:
    term.close()
  lines = out.split("\n")
  assert lines[0] == ("\rstep 10/20 [############------------] loss 0.5000  1,000 samples/s"
                      "  ETA 0:00:01\x1b[K")
  assert lines[1].startswith("\reval 1/2 [") and "\reval 2/2 [" in lines[1]
  assert lines[1].endswith("\r\x1b[Keval @ step 10: loss 0.4")
  assert lines[2].startswith("\rstep 20/20 [########################] loss 0.3000")
  assert lines[3:] == [""]


def test_off_a_terminal_a_bar_writes_occasional_lines():
  quiet, every = io.StringIO(), io.StringIO()
  slow = Bar(100, label="cases", stream=quiet)  # 10 s between lines by default
  fast = Bar(3, label="cases", stream=every, interval=0)
  for _ in range(100):
    slow.advance()
  for i in range(3):
    fast.advance(note=f"case {i}")
  slow.close()
  fast.close()
  assert quiet.getvalue() == ""  # done before a line was due
  alive = io.StringIO()
  with Bar(4, label="cases", stream=alive, interval=0.5) as bar:
    for _ in range(4):
      time.sleep(0.3)
      bar.advance()
  counts = [line.split(" [")[0] for line in alive.getvalue().splitlines()]
  assert 2 <= len(counts) < 4 and counts[-1] == "cases 4/4", counts  # when due; the end
  lines = every.getvalue().splitlines()
  assert [line.split(" [")[0] for line in lines] == ["cases 1/3", "cases 2/3", "cases 3/3"]
  assert "case 2  ETA" in lines[2] and "\r" not in every.getvalue()


def test_a_disabled_bar_draws_nothing_but_messages():
  stream = io.StringIO()
  bar = Bar(5, label="x", stream=stream, enabled=False)
  bar.update(3)
  bar.message("hello")
  bar.close()
  assert stream.getvalue() == "hello\n"


def test_a_short_evaluation_off_a_terminal_prints_nothing(capsys):
  model = meshnet.models.mlp([64, 16, 10])
  mesh = meshnet.make_mesh(data=-1)
  rng = np.random.default_rng(0)
  x = rng.random((300, 64), np.float32)
  y = rng.integers(0, 10, 300).astype(np.int32)
  result = evaluate(make_eval_step(model, mesh), model.init(jax.random.key(0)), x, y, mesh,
                    batch_size=48, progress=True)  # 7 batches
  assert 0 <= result["eval_accuracy"] <= 1
  assert capsys.readouterr().err == ""


def _train_on_a_terminal(*flags) -> str:
  """``meshnet train`` with stdout and stderr on a pseudo-terminal."""
  master, slave = os.openpty()
  proc = subprocess.Popen(
      [sys.executable, "-m", "meshnet", "train", "--devices", "2", "--hidden", "32",
       "--steps", "10", "--log-every", "5", "--eval-every", "10", "--eval-batch-size", "64",
       *flags], stdout=slave, stderr=slave, env=ENV)
  os.close(slave)
  out = b""
  try:
    while True:
      try:
        chunk = os.read(master, 65536)
      except OSError:  # EIO: the process closed the terminal
        break
      if not chunk:
        break
      out += chunk
  finally:
    os.close(master)
    assert proc.wait(timeout=300) == 0, out.decode()
  return out.decode().replace("\r\n", "\n")


def test_meshnet_train_on_a_terminal_draws_bars_unless_told_not_to():
  out = _train_on_a_terminal()
  assert "\rstep  5/10 [############------------] loss " in out
  assert "\reval 1/6 [####--------------------]" in out  # 359 test examples / 64
  assert "\r\x1b[Keval @ step 10: loss " in out  # the bar erased, the result printed
  quiet = _train_on_a_terminal("--no-progress")
  assert "step  5/10" not in quiet and "eval 1/6" not in quiet and "\x1b[K" not in quiet
  assert "eval @ step 10: loss " in quiet


def test_ticker_counts_seconds_on_a_terminal_and_erases_itself():
  from meshnet.metrics import Ticker
  terminal = _Terminal()
  with Ticker("restoring checkpoint 7", stream=terminal.stream, period=0.05):
    time.sleep(0.7)  # 14 periods: 2 redraws even on a loaded machine
  shown = terminal.read()
  assert shown.count("\rrestoring checkpoint 7 ... ") >= 2, shown
  assert shown.endswith("\r\x1b[K"), shown  # nothing left on the line
  terminal.close()

  quiet = io.StringIO()  # not a terminal: nothing drawn
  with Ticker("restoring checkpoint 7", stream=quiet, period=0.05):
    time.sleep(0.2)
  assert quiet.getvalue() == ""
  off = _Terminal()
  with Ticker("x", stream=off.stream, enabled=False, period=0.05):
    time.sleep(0.2)
  assert off.read() == ""
  off.close()
