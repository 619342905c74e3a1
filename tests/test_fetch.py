"""`meshnet data fetch`: against a real HTTP server on 127.0.0.1 (Range support,
a mode that ignores ranges, responses cut short), a closed port, and the
command itself in a subprocess."""

import gzip
import hashlib
import http.server
import io
import os
import pathlib
import re
import select
import socket
import struct
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import meshnet
from meshnet import cli
from meshnet.data import default_data_dir, load_dataset
from meshnet.errors import DownloadError
from meshnet.fetch import MNIST_MD5, RESUMES, fetch_mnist

ROOT = pathlib.Path(meshnet.__file__).resolve().parents[1]
IMAGES = "train-images-idx3-ubyte.gz"
LABELS = "t10k-labels-idx1-ubyte.gz"


def _idx_gz(array: np.ndarray) -> bytes:
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  return gzip.compress(header + array.tobytes(), mtime=0)


def _mnist_arrays(n_train=16, n_test=8) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {
      "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), np.uint8),
      "train-labels-idx1-ubyte.gz": rng.integers(0, 10, (n_train,), np.uint8),
      "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), np.uint8),
      "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, (n_test,), np.uint8),
  }


ARRAYS = _mnist_arrays()
FILES = {name: _idx_gz(array) for name, array in ARRAYS.items()}
TABLE = {name: hashlib.md5(data).hexdigest() for name, data in FILES.items()}


class _Handler(http.server.BaseHTTPRequestHandler):
  def log_message(self, *args):
    pass

  def do_GET(self):
    state = self.server.state
    name = self.path.lstrip("/")
    requested = self.headers.get("Range")
    if name not in state.files:
      state.requests.append((name, requested, 404))
      self.send_error(404)
      return
    data = state.files[name]
    status, start = 200, 0
    match = re.fullmatch(r"bytes=(\d+)-", requested or "")
    if match and not state.ignore_range:
      start = int(match.group(1))
      if start >= len(data):
        state.requests.append((name, requested, 416))
        self.send_response(416)
        self.send_header("Content-Range", f"bytes */{len(data)}")
        self.send_header("Content-Length", "0")
        self.end_headers()
        return
      status = 206
    body = data[start:]
    state.requests.append((name, requested, status))
    self.send_response(status)
    self.send_header("Content-Length", str(len(body)))
    if status == 206:
      self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
    self.end_headers()
    if state.stall is not None:  # part of the body, then nothing until the test ends
      self.wfile.write(body[:state.stall])
      self.wfile.flush()
      state.release.wait(60)
      return
    limit = state.cuts.pop(0) if state.cuts else state.limit
    self.wfile.write(body if limit is None else body[:limit])  # then the connection closes


class Server:
  """A real HTTP/1.0 server on an ephemeral port of 127.0.0.1, serving the
  test files under ``/mnist/``.

  Attributes:
    files: URL path (without the leading /) -> bytes it serves.
    ignore_range: answer Range requests with the whole file (200).
    cuts: per-response body limits, used up one per response (the header
      still announces the full length, then the connection closes).
    limit: the limit once ``cuts`` is used up (None: whole bodies).
    stall: send this many bytes of a body, then hang until ``release`` is set.
    requests: (name, Range header or None, status) of every request.
  """

  def __init__(self):
    self.files = {f"mnist/{name}": data for name, data in FILES.items()}
    self.ignore_range = False
    self.cuts: list[int] = []
    self.limit: int | None = None
    self.stall: int | None = None
    self.release = threading.Event()
    self.requests: list[tuple[str, str | None, int]] = []
    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    self.httpd.state = self
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mnist/"
    self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,),
                                   daemon=True)
    self.thread.start()

  def of(self, name):
    return [(r, status) for n, r, status in self.requests if n == f"mnist/{name}"]


@pytest.fixture
def server():
  s = Server()
  yield s
  s.release.set()
  s.httpd.shutdown()
  s.httpd.server_close()


def _fetch(directory, server_url, table=TABLE, stream=None):
  return fetch_mnist(str(directory), mirror=server_url, checksums=table,
                     stream=stream if stream is not None else io.StringIO())


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _leftovers(directory) -> list[str]:
  return sorted(p.name for p in pathlib.Path(directory).iterdir()
                if p.name.endswith(".part"))


def test_good_files_are_verified_written_and_then_skipped(server, tmp_path):
  out = io.StringIO()
  fetched = _fetch(tmp_path, server.url, stream=out)
  assert [f.action for f in fetched] == ["downloaded"] * 4
  for f in fetched:
    assert pathlib.Path(f.path).read_bytes() == FILES[f.name]
    assert f.size == len(FILES[f.name]) and f.path == str(tmp_path / f.name)
  assert _leftovers(tmp_path) == []
  lines = out.getvalue().splitlines()
  assert lines == [f"{name}: {len(data):,} bytes downloaded (MD5 ok)"
                   for name, data in FILES.items()]
  assert [r for _, r, _ in server.requests] == [None] * 4
  mtimes = {name: (tmp_path / name).stat().st_mtime_ns for name in FILES}

  out = io.StringIO()
  again = _fetch(tmp_path, server.url, stream=out)
  assert [f.action for f in again] == ["present"] * 4
  assert len(server.requests) == 4  # nothing downloaded the second time
  assert {name: (tmp_path / name).stat().st_mtime_ns for name in FILES} == mtimes
  assert out.getvalue().splitlines()[0] == (
      f"{IMAGES}: {len(FILES[IMAGES]):,} bytes, already present (MD5 ok)")

  ds = load_dataset("mnist", str(tmp_path))
  np.testing.assert_array_equal(ds.x_train, ARRAYS[IMAGES].reshape(16, 784) / np.float32(255))
  np.testing.assert_array_equal(ds.y_test, ARRAYS[LABELS])
  assert ds.x_test.shape == (8, 784)


def test_corrupt_file_is_an_error_and_nothing_is_kept(server, tmp_path):
  _fetch(tmp_path, server.url)
  (tmp_path / LABELS).unlink()
  before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
  corrupt = bytearray(FILES[LABELS])
  corrupt[-3] ^= 0xFF
  server.files[f"mnist/{LABELS}"] = bytes(corrupt)
  server.requests.clear()
  with pytest.raises(DownloadError) as info:
    _fetch(tmp_path, server.url)
  message = str(info.value)
  assert (f"{LABELS} from {server.url}{LABELS} has MD5 {hashlib.md5(corrupt).hexdigest()}, "
          f"expected {TABLE[LABELS]}") in message
  assert "downloaded twice" in message and "\n" not in message
  assert server.of(LABELS) == [(None, 200), (None, 200)]  # re-downloaded once
  assert len(server.requests) == 2  # the verified files were not downloaded again
  assert not (tmp_path / LABELS).exists() and _leftovers(tmp_path) == []
  after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
  assert after == before  # the good files are untouched


def test_corrupt_file_on_disk_is_replaced(server, tmp_path):
  (tmp_path / IMAGES).write_bytes(b"not the file")
  out = io.StringIO()
  fetched = _fetch(tmp_path, server.url, stream=out)
  assert fetched[0].action == "downloaded"
  assert (tmp_path / IMAGES).read_bytes() == FILES[IMAGES]
  bad = hashlib.md5(b"not the file").hexdigest()
  assert f"(MD5 ok; replaced a file with MD5 {bad})" in out.getvalue().splitlines()[0]


def test_partial_file_is_resumed_with_range(server, tmp_path):
  (tmp_path / (IMAGES + ".part")).write_bytes(FILES[IMAGES][:3000])
  out = io.StringIO()
  fetched = _fetch(tmp_path, server.url, stream=out)
  assert fetched[0].action == "resumed"
  assert server.of(IMAGES) == [("bytes=3000-", 206)]
  assert (tmp_path / IMAGES).read_bytes() == FILES[IMAGES]
  assert _leftovers(tmp_path) == []
  assert out.getvalue().splitlines()[0] == (
      f"{IMAGES}: {len(FILES[IMAGES]):,} bytes downloaded (MD5 ok; resumed at 3,000)")


def test_server_that_ignores_range_gives_the_whole_file(server, tmp_path):
  server.ignore_range = True
  (tmp_path / (IMAGES + ".part")).write_bytes(FILES[IMAGES][:3000])
  fetched = _fetch(tmp_path, server.url)
  assert fetched[0].action == "downloaded"
  assert server.of(IMAGES) == [("bytes=3000-", 200)]
  assert (tmp_path / IMAGES).read_bytes() == FILES[IMAGES]  # not 3000 bytes + the file


def test_wrong_partial_file_is_replaced(server, tmp_path):
  (tmp_path / (IMAGES + ".part")).write_bytes(b"\0" * 3000)
  out = io.StringIO()
  fetched = _fetch(tmp_path, server.url, stream=out)
  assert server.of(IMAGES) == [("bytes=3000-", 206), (None, 200)]
  assert fetched[0].action == "downloaded"
  assert (tmp_path / IMAGES).read_bytes() == FILES[IMAGES]
  assert "a first download had MD5" in out.getvalue().splitlines()[0]


def test_complete_partial_file_is_verified_and_renamed(server, tmp_path):
  (tmp_path / (IMAGES + ".part")).write_bytes(FILES[IMAGES])
  _fetch(tmp_path, server.url)
  assert server.of(IMAGES) == [(f"bytes={len(FILES[IMAGES])}-", 416)]
  assert (tmp_path / IMAGES).read_bytes() == FILES[IMAGES] and _leftovers(tmp_path) == []


def test_response_cut_short_is_resumed(server, tmp_path):
  server.cuts = [2000]  # Content-Length announces the whole file, 2000 bytes arrive
  fetched = _fetch(tmp_path, server.url)
  assert server.of(IMAGES) == [(None, 200), ("bytes=2000-", 206)]
  assert fetched[0].action == "downloaded"
  assert (tmp_path / IMAGES).read_bytes() == FILES[IMAGES]


def test_connection_that_keeps_ending_early_keeps_the_part_for_later(server, tmp_path):
  server.limit = 1000
  size = len(FILES[IMAGES])
  kept = 1000 * (RESUMES + 1)
  with pytest.raises(DownloadError) as info:
    _fetch(tmp_path, server.url)
  part = tmp_path / (IMAGES + ".part")
  assert str(info.value).startswith(
      f"the download of {server.url}{IMAGES} ended early ({kept:,} of {size:,} bytes, "
      f"kept in {part}); run the command again to resume it")
  assert len(server.of(IMAGES)) == RESUMES + 1
  assert part.read_bytes() == FILES[IMAGES][:kept] and not (tmp_path / IMAGES).exists()

  server.limit = None  # the network is back: the next run resumes
  fetched = _fetch(tmp_path, server.url)
  assert server.of(IMAGES)[-1] == (f"bytes={kept}-", 206)
  assert fetched[0].action == "resumed"
  assert (tmp_path / IMAGES).read_bytes() == FILES[IMAGES] and _leftovers(tmp_path) == []


def test_unreachable_server_names_the_url_and_what_to_do(tmp_path):
  url = f"http://127.0.0.1:{_closed_port()}/mnist/"
  with pytest.raises(DownloadError) as info:
    _fetch(tmp_path, url)
  message = str(info.value)
  assert message.startswith(f"cannot download {url}{IMAGES} (")
  assert "Connection refused" in message and "\n" not in message
  assert f"by hand from {url} into {tmp_path} and run `meshnet data fetch mnist " \
         f"--dir {tmp_path}` to verify them" in message
  assert not (tmp_path / IMAGES).exists() and _leftovers(tmp_path) == []


def test_missing_file_on_the_server_is_an_http_error(server, tmp_path):
  del server.files[f"mnist/{LABELS}"]
  with pytest.raises(DownloadError, match=re.escape(
      f"cannot download {server.url}{LABELS} (HTTP error 404 Not Found); check")):
    _fetch(tmp_path, server.url)
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(FILES) - {LABELS})


def test_terminal_shows_a_bar_that_ends_in_one_line_per_file(server, tmp_path):
  master, slave = os.openpty()
  with os.fdopen(slave, "w") as terminal:
    _fetch(tmp_path, server.url, stream=terminal)
  chunks = []
  while select.select([master], [], [], 0.5)[0]:
    try:
      data = os.read(master, 1 << 16)
    except OSError:  # EIO: the terminal is closed and everything was read
      break
    if not data:
      break
    chunks.append(data)
  os.close(master)
  text = b"".join(chunks).decode()
  size = len(FILES[IMAGES])
  assert f"\r{IMAGES} [{'#' * 24}] {size:,}/{size:,} bytes" in text  # the redrawn bar
  lines = [line.rsplit("\r", 1)[-1].replace("\x1b[K", "")
           for line in text.replace("\r\n", "\n").split("\n") if line]
  assert lines == [f"{name}: {len(data):,} bytes downloaded (MD5 ok)"
                   for name, data in FILES.items()]


def test_default_directory_is_where_training_looks(server, tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("MESHNET_DATA_DIR", str(tmp_path / "data"))
  assert default_data_dir("mnist") == str(tmp_path / "data" / "mnist")
  with pytest.raises(meshnet.MeshnetError) as info:
    load_dataset("mnist")
  assert (f"not found in {tmp_path / 'data' / 'mnist'} (the default data directory); run "
          "`meshnet data fetch mnist` to download the files there") in str(info.value)
  fetched = fetch_mnist(mirror=server.url, checksums=TABLE, stream=io.StringIO())
  assert {f.path for f in fetched} == {str(tmp_path / "data" / "mnist" / n) for n in FILES}
  np.testing.assert_array_equal(load_dataset("mnist").y_train, ARRAYS["train-labels-idx1-ubyte.gz"])
  assert cli.main(["train", "--dataset", "mnist", "--steps", "2", "--batch-size", "8",
                   "--eval-every", "0", "--no-progress"]) == 0
  captured = capsys.readouterr()
  assert "mnist: 16 train" in captured.out + captured.err  # the fetched files

  monkeypatch.delenv("MESHNET_DATA_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert default_data_dir("mnist") == str(tmp_path / "xdg" / "meshnet" / "mnist")
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert default_data_dir("mnist") == str(tmp_path / "home" / ".cache" / "meshnet" / "mnist")


def test_missing_file_error_names_the_fetch_command_for_that_dir(tmp_path):
  directory = tmp_path / "my data"
  with pytest.raises(meshnet.MeshnetError, match=re.escape(
      f"not found in {directory}; put train-images-idx3-ubyte.gz, ") + ".*" + re.escape(
      f"or run `meshnet data fetch mnist --dir '{directory}'` to download them")):
    load_dataset("mnist", str(directory))


def _meshnet(*argv, env_extra=None):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "-m", "meshnet", *argv], capture_output=True,
                        text=True, env=env, timeout=120)


def test_command_offline_is_one_line_naming_url_and_what_to_do(tmp_path):
  mirror = f"http://127.0.0.1:{_closed_port()}/mnist"
  proc = _meshnet("data", "fetch", "mnist", env_extra={
      "MESHNET_MNIST_MIRROR": mirror, "MESHNET_DATA_DIR": str(tmp_path)})
  assert proc.returncode == 2 and proc.stdout == ""
  err = proc.stderr
  assert err.startswith(f"meshnet: error: cannot download {mirror}/{IMAGES} (") and (
      err.count("\n") == 1), err
  assert (f"by hand from {mirror}/ into {tmp_path / 'mnist'} and run `meshnet data fetch "
          "mnist` to verify them") in err


def test_command_refuses_files_whose_checksum_is_wrong(server, tmp_path):
  """The real MD5s cannot match the test files: the first file is refused."""
  proc = _meshnet("data", "fetch", "mnist", "--dir", str(tmp_path), "--mirror", server.url)
  assert proc.returncode == 2
  actual = TABLE[IMAGES]
  assert proc.stderr == (
      f"meshnet: error: {IMAGES} from {server.url}{IMAGES} has MD5 {actual}, expected "
      f"{MNIST_MD5[IMAGES]} (downloaded twice and deleted; nothing written to "
      f"{tmp_path / IMAGES}); the mirror serves another file: pass another --mirror URL, "
      f"or put the right file into {tmp_path} by hand\n")
  assert server.of(IMAGES) == [(None, 200), (None, 200)]
  assert list(tmp_path.iterdir()) == []


def test_command_rejects_bad_mirror_and_unknown_dataset(tmp_path, capsys):
  assert cli.main(["data", "fetch", "mnist", "--dir", str(tmp_path), "--mirror",
                   "example.com"]) == 2
  assert capsys.readouterr().err.startswith(
      "meshnet: error: mirror 'example.com' is not an http://, https:// or file:// URL")
  with pytest.raises(SystemExit) as info:
    cli.main(["data", "fetch", "cifar"])
  assert info.value.code == 2 and "invalid choice: 'cifar'" in capsys.readouterr().err


def test_command_with_dir_that_is_a_file_says_so(tmp_path, capsys):
  (tmp_path / "f").write_text("x")
  for bad, says in ((tmp_path / "f", f"--dir {tmp_path / 'f'} is a file, not a directory"),
                    (tmp_path / "f" / "sub", "Not a directory")):
    assert cli.main(["data", "fetch", "mnist", "--dir", str(bad), "--mirror",
                     "http://127.0.0.1:9/"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshnet: error: ") and says in err and err.count("\n") == 1, err
  assert (tmp_path / "f").read_text() == "x"


def test_ctrl_c_keeps_the_partial_file_and_says_how_to_resume(tmp_path, server):
  half = len(FILES[IMAGES]) // 2
  server.stall = half
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  # With SIGINT's default action: a test runner started in the background
  # ignores SIGINT, and the child would inherit that.
  default_sigint = [sys.executable, "-c", "import os, signal, sys; "
                    "signal.signal(signal.SIGINT, signal.SIG_DFL); "
                    "os.execv(sys.executable, [sys.executable] + sys.argv[1:])"]
  proc = subprocess.Popen(default_sigint + ["-m", "meshnet", "data", "fetch", "mnist", "--dir",
                                            str(tmp_path), "--mirror", server.url],
                          env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  part = tmp_path / f"{IMAGES}.part"
  deadline = time.monotonic() + 60
  while not (part.exists() and part.stat().st_size == half) and time.monotonic() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 130, (out, err)
  assert part.stat().st_size == half and not (tmp_path / IMAGES).exists()
  assert f"`meshnet data fetch mnist --dir {tmp_path}` resumes it" in err, err

  server.stall = None  # the next fetch continues where the interrupted one stopped
  _fetch(tmp_path, server.url)
  assert server.of(IMAGES)[-1] == (f"bytes={half}-", 206)
  assert (tmp_path / IMAGES).read_bytes() == FILES[IMAGES]
