"""A disk that fills during a checkpoint save.

Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` with TensorStore
from background threads; when the file system is full, a write fails with
``ENOSPC`` and the error comes back, wrapped, where the main thread next
waits for the save: at the next save, at ``wait_until_finished`` or when the
manager closes. What it looks like (orbax-checkpoint 0.12, tensorstore):

  ``ValueError: RESOURCE_EXHAUSTED: Error opening "zarr" driver: Error
  writing "<leaf>/.zarray" in OCDBT database at local file ".../6.orbax-
  checkpoint-tmp/...": Failed to write 36301 bytes to file 5: No space left
  on device [tensorstore_spec=...] [os_error_code='28']``

raised once, logged three more times with tracebacks by Orbax's threads
(absl ERROR records), and once per other write that failed by asyncio
("exception was never retrieved", when the futures are collected). The unfinished directory is never renamed, so the
steps before stay complete; Orbax's own bookkeeping drops the failed step.

meshnet turns that into :class:`~meshnet.errors.DiskFullError` (one line: the
step, the directory, its free space from :func:`shutil.disk_usage`, the
newest complete step) and keeps Orbax's copies of the error off the terminal
unless ``--verbose`` (:class:`DiskFullLogFilter`).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import warnings

from meshnet.errors import DiskFullError

_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_TEXTS = tuple(os.strerror(code) for code in _ERRNOS) + tuple(
    f"os_error_code='{code}'" for code in _ERRNOS)


def is_disk_full(error: BaseException | None) -> bool:
  """Whether ``error``, or one it was raised from, says the file system (or
  the user's quota) is full: an ``OSError`` with ``ENOSPC``/``EDQUOT``, or
  TensorStore's text of one."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _ERRNOS:
      return True
    if any(text in str(error) for text in _TEXTS):
      return True
    error = error.__cause__ or error.__context__
  return False


def _size(nbytes: int) -> str:
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if nbytes >= scale:
      return f"{nbytes / scale:.1f} {unit}"
  return f"{nbytes} bytes"


def free_space(directory: str | os.PathLike) -> tuple[int, int] | None:
  """``(free, total)`` bytes of the file system holding ``directory`` (free:
  what an unprivileged user may still write); ``None`` where it cannot be
  asked (a remote URL, a directory gone)."""
  if "://" in os.fspath(directory):
    return None
  try:
    usage = shutil.disk_usage(directory)
  except OSError:
    return None
  return usage.free, usage.total


def disk_full_error(directory: str | os.PathLike, step: int | None,
                    kept: int | None = None, *, replacing: bool = False) -> DiskFullError:
  """The error for a save of ``step`` into ``directory`` that found no space
  (its free space is measured once the unfinished step is removed).

  Args:
    directory: the checkpoint directory.
    step: the step not saved; ``None``: the directory was full before the
      run saved anything.
    kept: the newest complete step left there (``None``: none).
    replacing: the run was replacing the steps there (``--overwrite``);
      they are kept.

  Example: ``no space left to save checkpoint 6 in /ck (44.0 kB free of
  1.0 MB); checkpoint 4 is kept; free some space or choose another
  --checkpoint-dir, then continue with --resume``.
  """
  usage = free_space(directory)
  free = usage[0] if usage else None
  where = f" ({_size(usage[0])} free of {_size(usage[1])})" if usage else ""
  if step is None:
    message = (f"no space left in checkpoint directory {directory}{where}; free some space "
               "or choose another --checkpoint-dir")
  elif replacing:
    message = (f"no space left to save checkpoint {step} in {directory}{where}; the "
               "checkpoints --overwrite was replacing are kept; free some space or choose "
               "another --checkpoint-dir")
  else:
    kept_text = (f"checkpoint {kept} is kept" if kept is not None
                 else "no earlier checkpoint there")
    message = (f"no space left to save checkpoint {step} in {directory}{where}; {kept_text}; "
               "free some space or choose another --checkpoint-dir, then continue with "
               "--resume")
  return DiskFullError(message, directory=os.fspath(directory), step=step, free_bytes=free)


class DiskFullLogFilter(logging.Filter):
  """Drops log records that report a disk-full error (Orbax's threads log
  each failure with a traceback before the main thread sees it; meshnet
  reports it in one line instead)."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if is_disk_full(error):
      return False
    return not any(text in record.getMessage() for text in _TEXTS)


_FILTER = DiskFullLogFilter()


def quiet_disk_full_logs() -> None:
  """Installs :class:`DiskFullLogFilter` on the ``absl`` logger (Orbax's
  threads) and the ``asyncio`` one (its writes that failed after the first:
  "_GatheringFuture exception was never retrieved"), once per process."""
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
      logger.addFilter(_FILTER)


def quiet_abandoned_writes() -> None:
  """Drops Python's "coroutine '...' was never awaited" warnings for the
  rest of the process. Called once a save has failed on a full disk: Orbax
  leaves the writes of that save that never started as coroutine objects,
  and when they are collected (often at exit, after meshnet's one-line
  error) Python prints a warning for each, which would make the error
  not the last line. Not installed before: an unawaited coroutine in a
  run that did not hit a full disk is someone's bug, and shows."""
  warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited",
                          category=RuntimeWarning)
