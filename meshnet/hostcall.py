"""A Python function inside a compiled CPU program, through XLA's FFI.

``jax.pure_callback`` wraps every operand as a ``jax.Array``, converts what
the function returns and copies it into XLA's result buffer: on this machine
about 0.6 ms per call for a 2 MB operand (``benchmarks/RESULTS.md``), and
1-1.3 ms of a 16 ms data-parallel step. :func:`host_call` instead registers
the function as an XLA FFI target through ``ctypes``: XLA calls it with its
own buffers, which the function sees as NumPy arrays (operands to read,
results to fill in place), with no conversion and no copy (0.05 ms per call
for the same 2 MB, most of it the copy the function itself makes).

The handler speaks XLA's FFI C ABI (``xla/ffi/api/c_api.h``, API 0.x,
stable by XLA's policy): it answers the runtime's metadata query with the
API version it was written against and, when called, reads the call frame's
operand and result buffers. CPU only: on accelerators the buffers are device
memory. An exception in the function becomes an XLA error carrying its
message (the program fails with it; nothing hangs).
"""

from __future__ import annotations

import ctypes as C
import itertools
import math
import struct
import threading
from typing import Callable, Sequence

import jax
import numpy as np

from meshnet.errors import MeshnetError

HostFn = Callable[[list[np.ndarray], list[np.ndarray]], None]

_API_MAJOR, _API_MINOR = 0, 1  # the c_api.h version these structs follow
_EXTENSION_METADATA = 1
_STAGE_EXECUTE = 3
_ERROR_INTERNAL = 13


class _ExtensionBase(C.Structure):
  _fields_ = [("struct_size", C.c_size_t), ("type", C.c_int), ("next", C.c_void_p)]


class _ApiVersion(C.Structure):
  _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p),
              ("major_version", C.c_int), ("minor_version", C.c_int)]


class _Metadata(C.Structure):
  _fields_ = [("struct_size", C.c_size_t), ("api_version", _ApiVersion),
              ("traits", C.c_uint32), ("state_type_id", C.c_int64)]


class _MetadataExtension(C.Structure):
  _fields_ = [("extension_base", _ExtensionBase), ("metadata", C.POINTER(_Metadata))]


class _Buffer(C.Structure):
  _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p),
              ("dtype", C.c_int), ("data", C.c_void_p), ("rank", C.c_int64),
              ("dims", C.POINTER(C.c_int64))]


class _Values(C.Structure):  # XLA_FFI_Args and XLA_FFI_Rets have one layout
  _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p),
              ("size", C.c_int64), ("types", C.POINTER(C.c_int)),
              ("values", C.POINTER(C.c_void_p))]


class _Attrs(C.Structure):
  _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p),
              ("size", C.c_int64), ("types", C.c_void_p), ("names", C.c_void_p),
              ("attrs", C.c_void_p)]


class _CallFrame(C.Structure):
  _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.POINTER(_ExtensionBase)),
              ("api", C.c_void_p), ("ctx", C.c_void_p), ("stage", C.c_int),
              ("args", _Values), ("rets", _Values), ("attrs", _Attrs),
              ("future", C.c_void_p)]


class _ErrorCreateArgs(C.Structure):
  _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p),
              ("message", C.c_char_p), ("errc", C.c_int)]


_ERROR_CREATE = C.CFUNCTYPE(C.c_void_p, C.POINTER(_ErrorCreateArgs))


class _RunIdGetArgs(C.Structure):
  _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p),
              ("ctx", C.c_void_p), ("run_id", C.c_int64)]


_RUN_ID_GET = C.CFUNCTYPE(C.c_void_p, C.POINTER(_RunIdGetArgs))


class _Api(C.Structure):  # the leading fields of XLA_FFI_Api
  _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p),
              ("api_version", _ApiVersion), ("internal_api", C.c_void_p),
              ("error_create", _ERROR_CREATE)]


# XLA_FFI_Api's functions follow error_create in c_api.h's order;
# XLA_FFI_RunId_Get is the 17th.
_RUN_ID_GET_OFFSET = _Api.error_create.offset + 16 * C.sizeof(C.c_void_p)

_HANDLER = C.CFUNCTYPE(C.c_void_p, C.c_void_p)  # XLA_FFI_CallFrame*

# XLA_FFI_DataType -> NumPy (ml_dtypes through jax.numpy for the narrow floats;
# 1- to 4-bit types are packed and have no NumPy view).
_DTYPES = {1: np.bool_, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.uint8,
           7: np.uint16, 8: np.uint32, 9: np.uint64, 10: np.float16, 11: np.float32,
           12: np.float64, 15: np.complex64, 16: jax.numpy.bfloat16, 18: np.complex128,
           19: jax.numpy.float8_e5m2, 20: jax.numpy.float8_e4m3fn,
           23: jax.numpy.float8_e4m3b11fnuz, 24: jax.numpy.float8_e5m2fnuz,
           25: jax.numpy.float8_e4m3fnuz}
_DTYPES.update({code: getattr(jax.numpy, name) for code, name in (
    (28, "float8_e4m3"), (29, "float8_e3m4"), (33, "float8_e8m0fnu"))
                if hasattr(jax.numpy, name)})  # newer formats

_NUMPY = {code: np.dtype(t) for code, t in _DTYPES.items()}
_names = itertools.count()
_lock = threading.Lock()
_handlers: dict[str, object] = {}  # keeps each ctypes function alive for the process
_run_id_getters: dict[int, Callable | None] = {}  # per XLA_FFI_Api address
_current = threading.local()  # the run id of the call this thread is in


_BUFFER = struct.Struct("<QQi4xQqQ")  # XLA_FFI_Buffer: size, extension, dtype, data, rank, dims


# XLA_FFI_CallFrame up to its results: size, extension, api, ctx, stage, then
# XLA_FFI_Args and XLA_FFI_Rets (size, extension, count, types, values).
_FRAME = struct.Struct("<QQQQi4x" + "QQqQQ" * 2)


def _addresses(pointer: int, n: int) -> tuple[int, ...]:
  """``n`` buffer addresses from an ``XLA_FFI_Args``/``Rets`` values array."""
  return struct.unpack(f"<{n}Q", C.string_at(pointer, 8 * n)) if n else ()


def _array(address: int) -> np.ndarray:
  """The NumPy view of an ``XLA_FFI_Buffer``'s memory (no copy)."""
  _, _, code, data, rank, dims = _BUFFER.unpack(C.string_at(address, _BUFFER.size))
  shape = struct.unpack(f"<{rank}q", C.string_at(dims, 8 * rank)) if rank else ()
  dtype = _NUMPY[code]
  count = math.prod(shape)
  if count == 0:
    return np.zeros(shape, dtype)
  raw = (C.c_char * (count * dtype.itemsize)).from_address(data)
  return np.frombuffer(raw, dtype, count).reshape(shape)


def _error(frame: _CallFrame, message: str) -> int | None:
  api = _Api.from_address(frame.api)
  args = _ErrorCreateArgs(C.sizeof(_ErrorCreateArgs), None, message.encode()[:4000],
                          _ERROR_INTERNAL)
  return api.error_create(C.byref(args))


def _run_id(api: int, ctx: int) -> int | None:
  """XLA's id of the program run making this call (one per execution of a
  compiled program), or None if this runtime's FFI has no RunId_Get."""
  get = _run_id_getters.get(api, False)
  if get is False:
    size = _Api.from_address(api).struct_size
    get = (_RUN_ID_GET(C.c_void_p.from_address(api + _RUN_ID_GET_OFFSET).value)
           if size >= _RUN_ID_GET_OFFSET + C.sizeof(C.c_void_p) else None)
    _run_id_getters[api] = get
  if get is None:
    return None
  args = _RunIdGetArgs(C.sizeof(_RunIdGetArgs), None, ctx, 0)
  return None if get(C.byref(args)) else args.run_id


def run_id() -> int | None:
  """Inside a :func:`host_call` function: the id of the compiled program's
  run that called it (the same for every call of one execution, another
  for the next), or None if XLA does not say. None outside a call."""
  return getattr(_current, "run", None)


def _handler(fn: HostFn) -> Callable:
  def handle(address):
    (_, extension, api, ctx, stage, _, _, n_args, _, args, _, _, n_rets, _, rets) = \
        _FRAME.unpack(C.string_at(address, _FRAME.size))
    if extension:  # XLA asks which FFI version the handler speaks
      base = _ExtensionBase.from_address(extension)
      if base.type == _EXTENSION_METADATA:
        metadata = _MetadataExtension.from_address(extension).metadata.contents
        metadata.api_version.major_version = _API_MAJOR
        metadata.api_version.minor_version = _API_MINOR
        metadata.traits = 0
        return None
    if stage != _STAGE_EXECUTE:
      return None
    try:
      _current.run = _run_id(api, ctx)
      fn([_array(a) for a in _addresses(args, n_args)],
         [_array(a) for a in _addresses(rets, n_rets)])
    except BaseException as e:  # noqa: BLE001 - every failure goes back to XLA
      return _error(_CallFrame.from_address(address), f"{type(e).__name__}: {e}")
    finally:
      _current.run = None
    return None
  return handle


def _check_dtypes(name: str, what: str, dtypes: Sequence) -> None:
  """Refuses, when the call is traced, a dtype the handler cannot view as a
  NumPy array (XLA packs the 1- to 4-bit types)."""
  for i, dtype in enumerate(dtypes):
    if np.dtype(dtype) not in _NUMPY.values():
      supported = ", ".join(sorted({str(d) for d in _NUMPY.values()}))
      raise MeshnetError(f"host_call {name!r}: {what} {i} is {np.dtype(dtype)}, which it "
                         f"cannot pass to Python; use one of {supported}")


def host_call(fn: HostFn, name: str = "host") -> Callable[..., list[jax.Array]]:
  """Registers ``fn`` as an XLA FFI target on CPU; returns
  ``call(results, *operands) -> list of arrays``.

  ``fn(operands, results)`` gets NumPy views of XLA's buffers: ``operands``
  (read them; do not keep them past the call) and ``results``, which it must
  fill in place, shaped and typed as ``results`` (``jax.ShapeDtypeStruct`` s)
  says. The call is not marked side-effecting: XLA may drop it if nothing
  reads its results, so use what it returns. (Marking it costs about 0.7 ms
  of dispatch and 0.6 ms per step of a 16 ms data-parallel step here, as
  the runtime then threads an ordering token through every call.) Register
  one function per call site: a target's name is unique, so two call sites
  are never merged (two calls of one target on the same operands may be).
  Calls that do not depend on each other may run at once, on several
  threads, in any order (XLA's CPU runtime runs independent work in
  parallel): ``fn`` must be thread-safe, or the program must chain them.
  :func:`run_id` tells ``fn`` which execution of the program called it.

  Use it inside ``jit`` or ``shard_map``; the results are typed like
  ``jax.ffi.ffi_call``'s. Raises MeshnetError off CPU.
  """
  with _lock:
    target = f"meshnet_{name}_{next(_names)}"
    callback = _HANDLER(_handler(fn))
    _handlers[target] = callback
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(callback), platform="cpu")

  def call(results: Sequence[jax.ShapeDtypeStruct], *operands) -> list[jax.Array]:
    platforms = {d.platform for d in jax.devices()}
    if platforms != {"cpu"}:
      raise MeshnetError(
          f"meshnet.hostcall.host_call ({name}) runs on CPU devices only; this run has "
          f"{sorted(platforms)}: on accelerators use the compiled collectives "
          "(--grad-transport xla)")
    _check_dtypes(name, "operand", [jax.numpy.result_type(x) for x in operands])
    _check_dtypes(name, "result", [r.dtype for r in results])
    return list(jax.ffi.ffi_call(target, list(results), has_side_effect=False)(*operands))

  return call
