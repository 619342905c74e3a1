"""Transformer layers as pure ``init``/``apply`` pairs.

Shapes are global (meshnet shards them) and live in names: ``B`` batch,
``T`` sequence (tokens), ``D`` model width, ``H`` heads, ``K`` per-head width
(``D = H * K``), ``F`` the MLP's hidden width, ``V`` vocabulary. No layer has
biases except the norms (as nanoGPT's ``bias=False``, PaLM, LLaMA).

Numerics for mixed precision: the norms and the attention softmax compute in
float32 and return the input's dtype, so a bfloat16 forward keeps its
statistics in float32.

Each ``*_init`` returns a dict of arrays; :func:`logical_axes_of` names the
same tree's dimensions for :mod:`meshnet.sharding` (Megatron pairs:
``qkv``/``up`` column-split over ``heads``/``mlp``, ``out``/``down``
row-split back to ``embed``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from meshnet.errors import MeshnetError

NORMS = ("layer", "rms")
POSITIONS = ("learned", "rotary")
ATTENTIONS = ("plain", "fused")
EMBEDDINGS = ("auto", "gather", "onehot")
ONEHOT_MAX_VOCAB = 1024
"""``embedding(kind="auto")`` multiplies one-hot rows on a GPU up to this
vocabulary (bytes: 256) and gathers above it, and everywhere else."""
_NORM_EPS = 1e-5
_ROPE_BASE = 10000.0


def normal_init(key: jax.Array, shape: tuple[int, ...], std: float,
                dtype=jnp.float32) -> jax.Array:
  """``std`` times a unit normal of ``shape`` (GPT-2's initialiser)."""
  return std * jax.random.normal(key, shape, dtype)


# -- embedding -----------------------------------------------------------------------

def embedding_init(key: jax.Array, vocab: int, width: int, *, std: float = 0.02,
                   dtype=jnp.float32) -> dict[str, jax.Array]:
  """A token table ``{"table": [V, D]}``, normal with ``std``."""
  return {"table": normal_init(key, (vocab, width), std, dtype)}


def embedding(params: dict[str, jax.Array], tokens_BxT: jax.Array, *,
              kind: str = "auto") -> jax.Array:
  """Rows of the table: ``int [B, T] -> [B, T, D]`` (the table's dtype).

  ``kind`` ``gather`` reads the rows (``jnp.take``; its gradient is a
  scatter-add into the table), ``onehot`` multiplies one-hot rows ``[B, T,
  V]`` by the table (its gradient a matmul: no atomic adds, which on a GPU
  serialise when many tokens share a row, as bytes of text do: on an H200,
  GPT-2 small's shape at V=256 on English bytes took 53.5 ms a step with
  ``gather`` and 36.5 with ``onehot``). ``onehot`` costs ``2 B T V D`` FLOPs
  each way (outside :mod:`meshnet.flops`' model FLOPs, as remat's are), so
  ``auto`` takes it where it was measured to pay: on a GPU (JAX's default
  backend), up to :data:`ONEHOT_MAX_VOCAB`; elsewhere it gathers. For valid
  ids the forward values are the same either way and the table's gradient
  sums the same terms in another order; an id outside ``[0, V)`` reads NaN
  (``gather``) or a zero row (``onehot``).
  """
  if not jnp.issubdtype(tokens_BxT.dtype, jnp.integer):
    raise MeshnetError(f"embedding needs integer token ids, got dtype {tokens_BxT.dtype}; "
                       "feed int32 tokens [B, T]")
  check_choice("embedding", kind, EMBEDDINGS)
  table = params["table"]
  if kind == "onehot" or (kind == "auto" and table.shape[0] <= ONEHOT_MAX_VOCAB
                          and jax.default_backend() == "gpu"):
    onehot_BxTxV = jax.nn.one_hot(tokens_BxT, table.shape[0], dtype=table.dtype)
    return jnp.einsum("btv,vd->btd", onehot_BxTxV, table)
  return jnp.take(table, tokens_BxT, axis=0)


def unembed(params: dict[str, jax.Array], x_BxTxD: jax.Array) -> jax.Array:
  """Logits against the token table (a tied head): ``[B, T, D] -> [B, T, V]``."""
  return jnp.einsum("btd,vd->btv", x_BxTxD, params["table"])


def positions_init(key: jax.Array, context: int, width: int, *, std: float = 0.02,
                   dtype=jnp.float32) -> dict[str, jax.Array]:
  """Learned absolute positions ``{"table": [T_max, D]}``."""
  return {"table": normal_init(key, (context, width), std, dtype)}


def add_positions(params: dict[str, jax.Array], x_BxTxD: jax.Array) -> jax.Array:
  """``x`` plus the first ``T`` rows of the position table.

  Raises:
    MeshnetError: ``T`` is longer than the table (the model's context).
  """
  length, context = x_BxTxD.shape[1], params["table"].shape[0]
  if length > context:
    raise MeshnetError(f"sequence of {length} tokens is longer than the model's context "
                       f"{context}; feed at most {context} tokens or build a longer context")
  return x_BxTxD + params["table"][None, :length].astype(x_BxTxD.dtype)


def rotary(x_BxTxHxK: jax.Array, *, base: float = _ROPE_BASE) -> jax.Array:
  """Rotary positions (RoFormer; the GPT-NeoX half-split layout): the pair
  ``(x[..., i], x[..., i + K/2])`` at position ``t`` is rotated by the angle
  ``t * base**(-2i/K)``. ``[B, T, H, K] -> [B, T, H, K]`` (``K`` even)."""
  length, k = x_BxTxHxK.shape[1], x_BxTxHxK.shape[-1]
  if k % 2:
    raise MeshnetError(f"rotary positions need an even per-head width, got {k}")
  half = k // 2
  freq_Kh = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_TxKh = jnp.arange(length, dtype=jnp.float32)[:, None] * freq_Kh[None, :]
  cos = jnp.cos(angle_TxKh)[None, :, None, :]
  sin = jnp.sin(angle_TxKh)[None, :, None, :]
  x = x_BxTxHxK.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxK.dtype)


# -- norms ---------------------------------------------------------------------------

def norm_init(width: int, kind: str = "layer", dtype=jnp.float32) -> dict[str, jax.Array]:
  """A norm's parameters: ``{"scale": [D], "bias": [D]}`` for ``layer``,
  ``{"scale": [D]}`` for ``rms``."""
  check_choice("norm", kind, NORMS)
  params = {"scale": jnp.ones((width,), dtype)}
  if kind == "layer":
    params["bias"] = jnp.zeros((width,), dtype)
  return params


def layer_norm(params: dict[str, jax.Array], x_BxTxD: jax.Array) -> jax.Array:
  """LayerNorm over ``D`` (float32 statistics, eps 1e-5): ``[..., D] -> [..., D]``."""
  x = x_BxTxD.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  y = (x - mean) * jax.lax.rsqrt(var + _NORM_EPS)
  y = y * _last_axis(params["scale"], y.ndim) + _last_axis(params["bias"], y.ndim)
  return y.astype(x_BxTxD.dtype)


def rms_norm(params: dict[str, jax.Array], x_BxTxD: jax.Array) -> jax.Array:
  """RMSNorm over ``D`` (float32 statistics, eps 1e-5): ``[..., D] -> [..., D]``."""
  x = x_BxTxD.astype(jnp.float32)
  y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + _NORM_EPS)
  return (y * _last_axis(params["scale"], y.ndim)).astype(x_BxTxD.dtype)


def _last_axis(v_D: jax.Array, ndim: int) -> jax.Array:
  """A float32 ``[D]`` vector shaped ``[1, ..., 1, D]`` to scale an ``ndim`` array."""
  return v_D.astype(jnp.float32).reshape((1,) * (ndim - 1) + v_D.shape)


def norm(params: dict[str, jax.Array], x_BxTxD: jax.Array) -> jax.Array:
  """:func:`layer_norm` or :func:`rms_norm`, as ``params`` say (a ``bias``
  means LayerNorm)."""
  return layer_norm(params, x_BxTxD) if "bias" in params else rms_norm(params, x_BxTxD)


# -- attention -----------------------------------------------------------------------

def attention_init(key: jax.Array, width: int, heads: int, *, out_std: float = 0.02,
                   dtype=jnp.float32) -> dict[str, jax.Array]:
  """Causal self-attention: ``{"qkv": [D, 3, H, K], "out": [H, K, D]}``.

  ``qkv`` is normal with std 0.02; ``out`` with ``out_std`` (GPT-2 scales the
  residual projections by ``1 / sqrt(2 * layers)``).

  Raises:
    MeshnetError: ``heads`` does not divide ``width``.
  """
  if width % heads:
    raise MeshnetError(f"width {width} is not divisible by heads {heads}; choose a width "
                       f"that is a multiple of the head count")
  k = width // heads
  k_qkv, k_out = jax.random.split(key)
  return {"qkv": normal_init(k_qkv, (width, 3, heads, k), 0.02, dtype),
          "out": normal_init(k_out, (heads, k, width), out_std, dtype)}


def causal_attention(params: dict[str, jax.Array], x_BxTxD: jax.Array, *,
                     rotary_positions: bool = False, kind: str = "plain") -> jax.Array:
  """Multi-head self-attention where position ``t`` sees positions ``<= t``.

  ``[B, T, D] -> [B, T, D]``. Scores are scaled by ``1 / sqrt(K)``; the
  softmax runs in float32. With ``rotary_positions`` the queries and keys are
  rotated by :func:`rotary` first. Split over ``tensor`` by heads, the
  ``out`` projection's contraction over ``H, K`` is the one reduction of the
  pair.

  ``kind`` picks how the scores are computed: ``plain`` writes them out
  (``[B, H, T, T]`` float32 scores, a masked softmax), ``fused`` calls
  ``jax.nn.dot_product_attention(is_causal=True)``, which XLA's backends
  lower to a fused kernel where they have one (cuDNN's flash attention on
  NVIDIA GPUs in bfloat16, with ``K <= 128``) and to the same arithmetic as
  ``plain`` elsewhere.
  """
  check_choice("attention", kind, ATTENTIONS)
  qkv_BxTx3xHxK = jnp.einsum("btd,dshk->btshk", x_BxTxD, params["qkv"])
  q, k, v = (qkv_BxTx3xHxK[:, :, i] for i in range(3))
  if rotary_positions:
    q, k = rotary(q), rotary(k)
  if kind == "fused":
    out_BxTxHxK = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                               implementation=_fused_implementation(q))
    return jnp.einsum("bthk,hkd->btd", out_BxTxHxK, params["out"])
  length, head_width = x_BxTxD.shape[1], q.shape[-1]
  scores_BxHxTxT = jnp.einsum("bthk,bshk->bhts", q, k).astype(jnp.float32)
  scores_BxHxTxT = scores_BxHxTxT / math.sqrt(head_width)
  causal_1x1xTxT = jnp.tril(jnp.ones((length, length), bool))[None, None]
  scores_BxHxTxT = jnp.where(causal_1x1xTxT, scores_BxHxTxT, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores_BxHxTxT, axis=-1).astype(v.dtype)
  out_BxTxHxK = jnp.einsum("bhts,bshk->bthk", probs, v)
  return jnp.einsum("bthk,hkd->btd", out_BxTxHxK, params["out"])


def _fused_implementation(q_BxTxHxK: jax.Array) -> str | None:
  """``cudnn`` where cuDNN's flash attention takes these queries (an NVIDIA
  GPU, half precision, a per-head width that is a multiple of 8 up to 128,
  more than one position: on an H200 it refused ``T = 1``), else ``None``
  (XLA's own lowering)."""
  length, k = q_BxTxHxK.shape[1], q_BxTxHxK.shape[-1]
  if (jax.default_backend() == "gpu" and q_BxTxHxK.dtype in (jnp.bfloat16, jnp.float16)
      and k % 8 == 0 and k <= 128 and length > 1):
    return "cudnn"
  return None


# -- MLP -----------------------------------------------------------------------------

def mlp_block_init(key: jax.Array, width: int, hidden: int, *, out_std: float = 0.02,
                   dtype=jnp.float32) -> dict[str, jax.Array]:
  """The transformer's MLP: ``{"up": [D, F], "down": [F, D]}`` (``down``
  normal with ``out_std``, the residual projection)."""
  k_up, k_down = jax.random.split(key)
  return {"up": normal_init(k_up, (width, hidden), 0.02, dtype),
          "down": normal_init(k_down, (hidden, width), out_std, dtype)}


def mlp_block(params: dict[str, jax.Array], x_BxTxD: jax.Array) -> jax.Array:
  """``gelu(x @ up) @ down`` (tanh GELU, as GPT-2): ``[B, T, D] -> [B, T, D]``."""
  h_BxTxF = jax.nn.gelu(jnp.einsum("btd,df->btf", x_BxTxD, params["up"]))
  return jnp.einsum("btf,fd->btd", h_BxTxF, params["down"])


# -- names ---------------------------------------------------------------------------

def logical_axes_of(layer: str, *, kind: str | None = None) -> dict[str, P]:
  """Logical names of a layer's parameters (one entry per dimension).

  ``layer`` is ``embedding`` (``table: [V, D]`` -> ``("vocab", "embed")``),
  ``positions`` (``[T, D]`` -> ``(None, "embed")``), ``norm`` (``kind``
  ``layer`` or ``rms``), ``attention`` (``qkv: ("embed", None, "heads",
  "kv")``, ``out: ("heads", "kv", "embed")``) or ``mlp`` (``up: ("embed",
  "mlp")``, ``down: ("mlp", "embed")``).
  """
  if layer == "embedding":
    return {"table": P("vocab", "embed")}
  if layer == "positions":
    return {"table": P(None, "embed")}
  if layer == "norm":
    names = {"scale": P("embed")}
    if check_choice("norm", kind, NORMS) == "layer":
      names["bias"] = P("embed")
    return names
  if layer == "attention":
    return {"qkv": P("embed", None, "heads", "kv"), "out": P("heads", "kv", "embed")}
  if layer == "mlp":
    return {"up": P("embed", "mlp"), "down": P("mlp", "embed")}
  raise MeshnetError(f"unknown layer {layer!r}; choose one of embedding, positions, norm, "
                     "attention, mlp")


def stacked(names: dict[str, P]) -> dict[str, P]:
  """``names`` of a layer whose leaves gained a leading ``[L]`` dimension
  (stacked identical blocks): ``"layers"`` prepended to each spec."""
  return jax.tree.map(lambda spec: P("layers", *spec), names,
                      is_leaf=lambda x: isinstance(x, P))


def check_choice(what: str, value, choices: tuple[str, ...]) -> str:
  """``value`` if it is one of ``choices``, else a one-line MeshnetError."""
  if value not in choices:
    raise MeshnetError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
  return value
