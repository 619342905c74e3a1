"""Errors meshnet raises for bad input: one line that names the value and the fix."""

from __future__ import annotations


class MeshnetError(ValueError):
  """A user-facing error: the message is one line naming the bad value and what to do.

  The ``meshnet`` command prints it as ``meshnet: error: <message>`` and exits
  with status 2, without a traceback.
  """


class NonFiniteLossError(MeshnetError, FloatingPointError):
  """The training loss became NaN or infinite; ``step`` is the first bad step."""

  def __init__(self, step: int, loss: float, hint: str = ""):
    self.step = step
    self.loss = loss
    message = f"loss is {loss} at step {step}; training stopped"
    if hint:
      message += f" ({hint})"
    super().__init__(message)


class NonFiniteStateError(MeshnetError, FloatingPointError):
  """An update made the parameters or optimizer state NaN or infinite while
  the loss (computed before the update) was still finite; ``step`` is the
  first such step. Nothing from that step on is saved."""

  def __init__(self, step: int, hint: str = ""):
    self.step = step
    message = (f"parameters or optimizer state became NaN or infinite at step {step} "
               "(the loss before the update was finite); training stopped, nothing from "
               "that step saved")
    if hint:
      message += f" ({hint})"
    super().__init__(message)


class DownloadError(MeshnetError):
  """``meshnet data fetch`` could not get a verified file: the server is
  unreachable, the connection kept ending early, or the file's MD5 checksum is
  not the expected one. The message names the URL or file and what to do."""


class DiskFullError(MeshnetError):
  """A checkpoint save found its file system full (``ENOSPC``) or the user's
  quota used up (``EDQUOT``). The earlier checkpoints are intact and the
  unfinished step is removed. Attributes: ``directory``, ``step`` (the step
  that was not saved; ``None``: the directory was full when the run opened
  it) and ``free_bytes`` (free space then; ``None`` where it cannot be
  asked)."""

  def __init__(self, message: str, *, directory: str, step: int | None,
               free_bytes: int | None):
    self.directory = directory
    self.step = step
    self.free_bytes = free_bytes
    super().__init__(message)
