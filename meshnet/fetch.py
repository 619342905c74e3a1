"""``meshnet data fetch``: download data set files once, verified and resumable.

Training never downloads. ``meshnet data fetch mnist`` puts the four MNIST
IDX files where ``meshnet train --dataset mnist`` looks without
``--data-dir`` (:func:`meshnet.data.default_data_dir`), or in ``--dir DIR``
(then train with ``--data-dir DIR``).

Each file is downloaded to ``NAME.part`` next to its final name, checked
against its MD5 checksum, and renamed to ``NAME`` only when it matches, so a
file under its final name is always complete and verified:

* a file already present with the right checksum is skipped;
* a ``.part`` left by an interrupted download is resumed with an HTTP
  ``Range`` request (or downloaded whole if the server ignores the range);
  a connection that ends early is resumed the same way, a few times;
* a complete download with the wrong checksum is downloaded once more from
  the start; if it is still wrong, :class:`~meshnet.errors.DownloadError`
  names the file and both checksums, and the bad bytes are deleted.

Only the standard library (``urllib``) is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import re
import shlex
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Mapping, TextIO

from meshnet.data import MNIST_FILES, default_data_dir
from meshnet.errors import DownloadError, MeshnetError

# The mirror torchvision tries first for MNIST (torchvision.datasets.MNIST.mirrors).
MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
# Overrides MNIST_MIRROR (e.g. a local copy: file:///data/mnist/ or http://host/mnist/).
ENV_MNIST_MIRROR = "MESHNET_MNIST_MIRROR"
# File name -> MD5 of the gzip file as published (the checksums torchvision checks).
MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
assert sorted(MNIST_MD5) == sorted(f"{stem}.gz" for stem in MNIST_FILES.values())
FETCHABLE: tuple[str, ...] = ("mnist",)

PART_SUFFIX = ".part"
RESUMES = 3  # resumptions of one download after its connection ended early
TIMEOUT_S = 30.0  # connect / read timeout of one request
_CHUNK = 1 << 16
_REDRAW_S = 0.1


@dataclasses.dataclass(frozen=True)
class Fetched:
  """What :func:`fetch_files` did with one file.

  Attributes:
    name: the file name.
    path: where it is now (verified).
    size: its size in bytes.
    action: ``"present"`` (already there and verified, nothing downloaded),
      ``"downloaded"`` or ``"resumed"`` (a ``.part`` was continued).
  """

  name: str
  path: str
  size: int
  action: str


def md5_of(path: str) -> str:
  """The hex MD5 of the file at ``path``."""
  digest = hashlib.md5(usedforsecurity=False)
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def mirror_url(mirror: str | None = None) -> str:
  """The base URL to download MNIST from: ``mirror``, else ``$MESHNET_MNIST_MIRROR``,
  else :data:`MNIST_MIRROR`; always ending in ``/``.

  Raises:
    MeshnetError: not an ``http://``, ``https://`` or ``file://`` URL.
  """
  url = mirror or os.environ.get(ENV_MNIST_MIRROR) or MNIST_MIRROR
  if urllib.parse.urlsplit(url).scheme not in ("http", "https", "file"):
    raise MeshnetError(
        f"mirror {url!r} is not an http://, https:// or file:// URL; pass the URL of the "
        f"directory holding the files, e.g. --mirror {MNIST_MIRROR}"
    )
  return url if url.endswith("/") else url + "/"


class _Line:
  """One line of progress for one file.

  On a terminal it is redrawn in place (bytes so far and a bar when the size
  is known) and then replaced by the final line; elsewhere only the final
  line is written.
  """

  def __init__(self, name: str, stream: TextIO, width: int = 24):
    self.name = name
    self.stream = stream
    self.width = width
    self.inline = stream.isatty()
    self._last = 0.0

  def update(self, done: int, total: int | None, *, force: bool = False) -> None:
    now = time.monotonic()
    if not self.inline or (not force and now - self._last < _REDRAW_S):
      return
    self._last = now
    if total:
      filled = min(self.width, self.width * done // total)
      bar = f"[{'#' * filled}{'-' * (self.width - filled)}] {done:,}/{total:,} bytes"
    else:
      bar = f"{done:,} bytes"
    self.stream.write(f"\r{self.name} {bar}\x1b[K")
    self.stream.flush()

  def done(self, text: str) -> None:
    prefix = "\r" if self.inline else ""
    suffix = "\x1b[K" if self.inline else ""
    self.stream.write(f"{prefix}{self.name}: {text}{suffix}\n")
    self.stream.flush()


def _content_range_start(value: str | None) -> int | None:
  match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
  return int(match.group(1)) if match else None


class _Download:
  """Downloads ``url`` into ``part``, resuming what ``part`` already holds."""

  def __init__(self, url: str, part: str, *, unreachable_hint: str, timeout: float,
               line: _Line):
    self.url = url
    self.part = part
    self.hint = unreachable_hint
    self.timeout = timeout
    self.line = line

  def _have(self) -> int:
    return os.path.getsize(self.part) if os.path.exists(self.part) else 0

  def _open(self, start: int):
    """The response for bytes ``start..``, or None if ``part`` is already the
    whole file (the server answered 416: nothing left to send)."""
    headers = {"User-Agent": "meshnet-fetch"}
    if start:
      headers["Range"] = f"bytes={start}-"
    request = urllib.request.Request(self.url, headers=headers)
    try:
      return urllib.request.urlopen(request, timeout=self.timeout)
    except urllib.error.HTTPError as e:
      if e.code == 416 and start:
        e.close()
        return None
      reason = f"HTTP error {e.code} {e.reason}"
    except urllib.error.URLError as e:
      reason = str(e.reason)
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, bad replies
      reason = str(e) or type(e).__name__
    raise DownloadError(f"cannot download {self.url} ({reason}); {self.hint}")

  def run(self) -> int:
    """Downloads the rest of the file; returns the byte offset it resumed at.

    Raises:
      DownloadError: the server cannot be reached, or the connection ended
        early more than :data:`RESUMES` times (or once without sending a byte)
        before the file was complete; what arrived stays in ``part`` for the
        next run.
    """
    resumed_from = self._have()
    ended_early = 0
    while True:
      have = self._have()
      response = self._open(have)
      if response is None:
        return resumed_from
      with response:
        status = response.status or 200  # file:// URLs have no status
        if have and status == 206 and (
            _content_range_start(response.headers.get("Content-Range")) != have):
          os.remove(self.part)  # a range we did not ask for: start again without one
          resumed_from = 0
          continue
        if have and status != 206:
          have = resumed_from = 0  # the server ignored the range: take the whole file
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        got, error = self._copy(response, have, total)
      if error is None and (total is None or got == total):
        return resumed_from
      ended_early = ended_early + 1 if got > have else RESUMES + 1
      if ended_early > RESUMES:
        so_far = f"{got:,} of {total:,} bytes" if total else f"{got:,} bytes"
        why = f": {error}" if error else ""
        raise DownloadError(
            f"the download of {self.url} ended early{why} ({so_far}, kept in "
            f"{self.part}); run the command again to resume it, or {self.hint}"
        )

  def _copy(self, response, have: int, total: int | None) -> tuple[int, str | None]:
    """Appends the response body to ``part`` from offset ``have``; returns the
    size reached and the error that cut the body short (None if none did)."""
    try:
      f = open(self.part, "r+b" if have else "wb")
    except OSError as e:
      raise MeshnetError(f"cannot write {self.part}: {e}; pass --dir DIR somewhere "
                         "writable") from None
    got, error = have, None
    with f:
      f.seek(have)
      f.truncate()
      while True:
        try:
          # read1: what has arrived (up to _CHUNK), so the .part holds every
          # byte received when the download stops (Ctrl-C, a stalled server).
          chunk = response.read1(_CHUNK)
        except (OSError, http.client.HTTPException) as e:  # reset, timeout, bad chunk
          error = str(e) or type(e).__name__
          break
        if not chunk:
          break
        try:
          f.write(chunk)
        except OSError as e:
          raise MeshnetError(f"cannot write {self.part}: {e}") from None
        got += len(chunk)
        self.line.update(got, total)
      f.flush()
      os.fsync(f.fileno())
    self.line.update(got, total, force=True)
    return got, error


def _fetch_one(name: str, md5: str, directory: str, base_url: str, *, hint: str,
               timeout: float, stream: TextIO) -> Fetched:
  final = os.path.join(directory, name)
  part = final + PART_SUFFIX
  line = _Line(name, stream)
  notes = []
  if os.path.isfile(final):
    actual = md5_of(final)
    if actual == md5:
      size = os.path.getsize(final)
      line.done(f"{size:,} bytes, already present (MD5 ok)")
      return Fetched(name, final, size, "present")
    notes.append(f"replaced a file with MD5 {actual}")
  url = base_url + name
  download = _Download(url, part, unreachable_hint=hint, timeout=timeout, line=line)
  for attempt in range(2):
    resumed_from = download.run()
    actual = md5_of(part)
    if actual == md5:
      break
    os.remove(part)
    if attempt == 0:
      notes.append(f"a first download had MD5 {actual}")
  else:
    raise DownloadError(
        f"{name} from {url} has MD5 {actual}, expected {md5} (downloaded twice and "
        f"deleted; nothing written to {final}); the mirror serves another file: pass "
        f"another --mirror URL, or put the right file into {directory} by hand"
    )
  os.replace(part, final)
  size = os.path.getsize(final)
  if resumed_from:
    notes.insert(0, f"resumed at {resumed_from:,}")
  extra = "".join(f"; {note}" for note in notes)
  line.done(f"{size:,} bytes downloaded (MD5 ok{extra})")
  return Fetched(name, final, size, "resumed" if resumed_from else "downloaded")


def fetch_files(files: Mapping[str, str], directory: str, base_url: str, *,
                timeout: float = TIMEOUT_S, stream: TextIO | None = None,
                hint: str | None = None) -> list[Fetched]:
  """Downloads ``base_url + name`` to ``directory/name`` for each file, verified.

  Files already present with the right MD5 are skipped; others are
  downloaded (resuming a ``NAME.part``) and renamed into place only once
  their checksum matches. Writes one line per file to ``stream``.

  Args:
    files: file name -> expected hex MD5 (lower case).
    directory: where the files go (created if missing).
    base_url: the URL of the directory holding the files, ending in ``/``.
    timeout: seconds before a request that gets no answer fails.
    stream: where progress goes (default stdout); a terminal gets a
      redrawn bar.
    hint: what to tell the user when the server cannot be reached
      (default: check the network, or download the files by hand).

  Returns:
    One :class:`Fetched` per file, in the order of ``files``.

  Raises:
    DownloadError: naming the URL (unreachable, or the connection kept
      ending early) or the file and both MD5s (the checksum is still wrong
      after a second download). Files done before the failure stay.
    MeshnetError: ``directory`` cannot be created or written.
  """
  stream = stream or sys.stdout
  directory = os.path.expanduser(directory)
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise MeshnetError(f"--dir {directory} is a file, not a directory; pass --dir DIR "
                       "naming a directory (created if missing)")
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise MeshnetError(f"cannot create {directory}: {e}; pass --dir DIR somewhere "
                       "writable") from None
  if hint is None:
    hint = (f"check the network connection, or download {', '.join(files)} by hand "
            f"from {base_url} into {directory}")
  return [_fetch_one(name, md5.lower(), directory, base_url, hint=hint, timeout=timeout,
                     stream=stream)
          for name, md5 in files.items()]


def fetch_mnist(directory: str | None = None, *, mirror: str | None = None,
                checksums: Mapping[str, str] = MNIST_MD5, timeout: float = TIMEOUT_S,
                stream: TextIO | None = None) -> list[Fetched]:
  """Downloads the four MNIST IDX files (gzip) and verifies their MD5s.

  Afterwards ``load_dataset("mnist", directory)`` reads them (with the
  default directory, ``load_dataset("mnist")`` and ``meshnet train --dataset
  mnist`` do).

  Args:
    directory: where to put them; default
      :func:`meshnet.data.default_data_dir` ``("mnist")``.
    mirror: base URL holding the files; default ``$MESHNET_MNIST_MIRROR``,
      else :data:`MNIST_MIRROR` (the mirror torchvision uses).
    checksums: file name -> MD5; :data:`MNIST_MD5` unless you serve your own
      files.
    timeout: seconds before a request that gets no answer fails.
    stream: where the one line per file goes (default stdout).

  Returns:
    One :class:`Fetched` per file.

  Raises:
    DownloadError: as :func:`fetch_files`; when offline the message names the
      URL and says how to put the files there by hand.
  """
  directory = os.path.expanduser(directory) if directory else default_data_dir("mnist")
  base_url = mirror_url(mirror)
  command = "meshnet data fetch mnist" + (
      "" if directory == default_data_dir("mnist") else f" --dir {shlex.quote(directory)}")
  hint = (f"check the network connection (or pass --mirror URL / set {ENV_MNIST_MIRROR}), "
          f"or download {', '.join(checksums)} by hand from {base_url} into {directory} "
          f"and run `{command}` to verify them")
  return fetch_files(checksums, directory, base_url, timeout=timeout, stream=stream,
                     hint=hint)


def fetch_command(dataset: str, directory: str | None = None, *,
                  mirror: str | None = None) -> int:
  """``meshnet data fetch DATASET [--dir DIR] [--mirror URL]``; returns the exit status.

  Raises:
    MeshnetError: unknown data set, or as :func:`fetch_mnist`.
  """
  if dataset not in FETCHABLE:
    raise MeshnetError(f"cannot fetch dataset {dataset!r}; choose one of "
                       f"{', '.join(FETCHABLE)}")
  try:
    fetched = fetch_mnist(directory, mirror=mirror)
  except KeyboardInterrupt:
    again = "meshnet data fetch mnist" + (f" --dir {shlex.quote(directory)}" if directory else "")
    print(f"meshnet: download interrupted; a partial file is kept as .part and `{again}` "
          "resumes it", file=sys.stderr)
    return 130
  where = os.path.dirname(fetched[0].path)
  flag = "" if where == default_data_dir("mnist") else f" --data-dir {shlex.quote(where)}"
  print(f"MNIST is in {where}; train with: meshnet train --dataset mnist{flag}")
  return 0
