"""The embedded text corpus: English that Python itself ships, no download.

``meshnet train --dataset text`` without ``--data-dir`` trains on it. It is
built, on first use in a process, from two parts of the running Python's
standard library, in a fixed order:

1. the help topics of ``pydoc_data.topics`` (the language reference text
   that ``help("assert")`` prints), sorted by topic name;
2. the docstrings of :data:`STDLIB_MODULES` (module, class and function
   docstrings in source order, ``inspect.cleandoc``-ed), read from their
   ``.py`` sources with :mod:`ast` (nothing is imported); a module whose
   source is missing from this installation is skipped.

Pieces are joined by :data:`SEPARATOR`. On CPython 3.11 that is about
1.1 MB (0.47 MB of topics, 0.65 MB of docstrings). The bytes are the same on
every run of one Python version; another version ships other text, and a
checkpoint's data fingerprint then tells a resume that the corpus changed.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import sysconfig
from typing import NamedTuple

# Between two pieces (topics, docstrings) of the embedded corpus, and
# between two files of a --data-dir folder (meshnet.data.text).
SEPARATOR = b"\n\n"

# Standard-library modules whose docstrings join the help topics: pure-Python,
# well documented, present in every CPython 3 installation that ships sources.
STDLIB_MODULES: tuple[str, ...] = (
    "argparse", "ast", "asyncio.events", "asyncio.tasks", "base64", "bisect", "calendar",
    "cmd", "codecs", "collections", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "difflib", "email.message", "enum", "fileinput", "fnmatch",
    "fractions", "functools", "gettext", "glob", "gzip", "heapq", "http.client",
    "http.cookiejar", "inspect", "ipaddress", "json", "logging", "logging.handlers",
    "numbers", "optparse", "os", "pathlib", "pickle", "pprint", "pydoc", "queue",
    "random", "sched", "selectors", "shlex", "shutil", "socket", "socketserver",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "traceback", "turtle", "typing", "unittest.case",
    "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref",
    "zipfile",
)


class Corpus(NamedTuple):
  """A byte corpus and what identifies it.

  Attributes:
    data: the text, UTF-8 bytes.
    sha256: hex SHA-256 of ``data``.
    sources: where it came from, one entry per piece group (file paths for a
      ``--data-dir``; ``pydoc_data.topics`` and the module names for the
      embedded corpus).
  """

  data: bytes
  sha256: str
  sources: tuple[str, ...]

  @property
  def num_bytes(self) -> int:
    return len(self.data)


def _module_source(name: str) -> str | None:
  """The path of stdlib module ``name``'s source (``a.b`` -> ``a/b.py`` or
  ``a/b/__init__.py``), or ``None`` when this installation lacks it."""
  stdlib = sysconfig.get_path("stdlib")
  base = os.path.join(stdlib, *name.split("."))
  for path in (base + ".py", os.path.join(base, "__init__.py")):
    if os.path.isfile(path):
      return path
  return None


def docstrings(source: str | bytes) -> list[str]:
  """The module, class and function docstrings of Python ``source``, in
  source order (depth first), cleaned as ``inspect.cleandoc`` does."""
  found: list[str] = []

  def visit(node: ast.AST) -> None:
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node, clean=True)
      if doc:
        found.append(doc)
    for child in ast.iter_child_nodes(node):
      visit(child)

  visit(ast.parse(source))
  return found


@functools.lru_cache(maxsize=1)
def embedded_corpus() -> Corpus:
  """The embedded corpus (built once per process; about 1 s on a slow core).

  Returns:
    a :class:`Corpus`: help topics then stdlib docstrings, joined by
    :data:`SEPARATOR`.
  """
  from pydoc_data.topics import topics

  pieces = [topics[name].strip() for name in sorted(topics)]
  sources = ["pydoc_data.topics"]
  for module in STDLIB_MODULES:
    path = _module_source(module)
    if path is None:
      continue
    try:
      with open(path, "rb") as f:
        pieces.extend(docstrings(f.read()))
    except (OSError, SyntaxError, ValueError):  # unreadable, or another Python's syntax
      continue
    sources.append(module)
  data = SEPARATOR.join(piece.encode("utf-8", "replace") for piece in pieces if piece)
  return Corpus(data, hashlib.sha256(data).hexdigest(), tuple(sources))
