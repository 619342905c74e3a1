"""GPT: a decoder-only transformer with stacked blocks.

``meshnet.models.gpt("tiny")`` maps tokens ``int32 [B, T]`` to logits
``float32 [B, T, V]`` (``V = 256``: bytes): token embedding (+ learned
positions, or rotary positions inside attention), ``L`` pre-norm blocks
``x + attn(norm(x))``, ``x + mlp(norm(x))``, a final norm and the head (the
token table, tied, or its own ``[D, V]`` matrix).

The blocks are *stacked*: every block leaf has a leading ``[L]`` dimension
and ``apply`` runs a ``jax.lax.scan`` over them, so the compiled program
does not grow with depth. The parameter tree is three parts, in the order a
pipeline cuts it::

  {"embed":  {"tokens": {"table": [V, D]}, "positions": {"table": [T, D]}},
   "blocks": {"attn_norm": {"scale": [L, D], "bias": [L, D]},
              "attn": {"qkv": [L, D, 3, H, K], "out": [L, H, K, D]},
              "mlp_norm": {...}, "mlp": {"up": [L, D, F], "down": [L, F, D]}},
   "head":   {"norm": {"scale": [D], "bias": [D]}, "w": [D, V]}}

(``positions`` only with learned positions, ``head.w`` only when untied,
``bias`` only with LayerNorm). :func:`embed_apply`, :func:`block_apply` and
:func:`head_apply` run each part, so a pipeline can put ``embed`` on its
first stage, a slice ``[l0:l1]`` of every ``blocks`` leaf on each stage and
``head`` (with the loss) on the last. A tied head reads ``embed.tokens`` on
the last stage, so pipelines want ``tie_embeddings=False`` (the default).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from meshnet import nn
from meshnet.errors import MeshnetError
from meshnet.model import Model
from meshnet.nn_transformer import check_choice

GPT_SIZES: dict[str, dict[str, int]] = {
    # 0.47M parameters; ~20k tokens/s training on 2 CPU cores (8 simulated devices).
    "tiny": dict(layers=2, heads=4, width=128, context=64),
    # nanoGPT's shakespeare-char model: 10.7M parameters.
    "mini": dict(layers=6, heads=6, width=384, context=256),
    # GPT-2's shapes (Radford et al. 2019). With V = 256 bytes instead of
    # GPT-2's 50257 BPE tokens, small has 86.2M parameters (85.96M tied),
    # not 124M; medium 304M, large 710M.
    "small": dict(layers=12, heads=12, width=768, context=1024),
    "medium": dict(layers=24, heads=16, width=1024, context=1024),
    "large": dict(layers=36, heads=20, width=1280, context=1024),
}
"""Named shapes for ``--gpt-size``: layers ``L``, heads ``H``, width ``D``
and context ``T``; per-head width ``K = D / H``, MLP width ``4 D``."""


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """A GPT's shape and options.

  Attributes:
    layers: blocks ``L``.
    heads: attention heads ``H`` (must divide ``width``).
    width: model width ``D``.
    context: longest sequence ``T`` (the learned position table's rows).
    vocab: vocabulary ``V`` (256: bytes).
    mlp_ratio: the MLP's hidden width is ``mlp_ratio * width``.
    positions: ``learned`` (a ``[T, D]`` table added to the embedding) or
      ``rotary`` (queries and keys rotated; no parameters).
    norm: ``layer`` (LayerNorm with scale and bias, GPT-2) or ``rms``.
    tie_embeddings: the head is the token table (GPT-2) rather than its own
      ``[D, V]`` matrix.
    dropout: rate after the embedding and on each residual branch, when
      training.
    attention: ``plain`` (scores written out, a masked float32 softmax) or
      ``fused`` (``jax.nn.dot_product_attention``: cuDNN's flash attention
      on NVIDIA GPUs in bfloat16; XLA's arithmetic elsewhere). See
      :func:`meshnet.nn.causal_attention`.
    embedding: how tokens read the table: ``gather`` (``jnp.take``),
      ``onehot`` (a one-hot matmul, no scatter-add in the backward) or
      ``auto`` (``onehot`` on a GPU up to vocabulary 1024, else ``gather``); see
      :func:`meshnet.nn.embedding`.
    remat: checkpoint each block (``jax.checkpoint`` with
      ``nothing_saveable`` around the scan's body): the backward keeps each
      block's input and recomputes the block.
  """

  layers: int
  heads: int
  width: int
  context: int
  vocab: int = 256
  mlp_ratio: int = 4
  positions: str = "learned"
  norm: str = "layer"
  tie_embeddings: bool = False
  dropout: float = 0.0
  attention: str = "plain"
  embedding: str = "auto"
  remat: bool = False

  def __post_init__(self):
    for name in ("layers", "heads", "width", "context", "vocab", "mlp_ratio"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MeshnetError(f"gpt {name}={value!r} must be an integer >= 1")
    if self.width % self.heads:
      raise MeshnetError(
          f"gpt width {self.width} is not divisible by heads {self.heads}; choose a width "
          f"that is a multiple of the head count (--width, --heads)")
    check_choice("gpt positions", self.positions, nn.POSITIONS)
    check_choice("gpt norm", self.norm, nn.NORMS)
    check_choice("gpt attention", self.attention, nn.ATTENTIONS)
    check_choice("gpt embedding", self.embedding, nn.EMBEDDINGS)
    if self.positions == "rotary" and self.head_width % 2:
      raise MeshnetError(f"rotary positions need an even per-head width; width "
                         f"{self.width} / heads {self.heads} = {self.head_width}")
    if not 0.0 <= self.dropout < 1.0:
      raise MeshnetError(f"gpt dropout {self.dropout} must be in [0, 1)")

  @property
  def head_width(self) -> int:
    """Per-head width ``K = D / H``."""
    return self.width // self.heads

  @property
  def mlp_width(self) -> int:
    """The MLP's hidden width ``F``."""
    return self.mlp_ratio * self.width


def gpt_config(size: str | None = "tiny", **overrides: Any) -> GPTConfig:
  """The :class:`GPTConfig` of a named size with ``overrides`` (``None``
  values are ignored, so CLI flags that were not given pass through).

  Raises:
    MeshnetError: an unknown size, or a size of ``None`` without all of
      ``layers``, ``heads``, ``width`` and ``context``.
  """
  fields = {k: v for k, v in overrides.items() if v is not None}
  unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(GPTConfig)})
  if unknown:
    raise MeshnetError(f"gpt has no option {unknown[0]!r}; options are "
                       f"{', '.join(f.name for f in dataclasses.fields(GPTConfig))}")
  if size is not None:
    if size not in GPT_SIZES:
      raise MeshnetError(f"unknown gpt size {size!r}; choose one of {', '.join(GPT_SIZES)} "
                         "(--gpt-size)")
    fields = {**GPT_SIZES[size], **fields}
  missing = [f for f in ("layers", "heads", "width", "context") if f not in fields]
  if missing:
    raise MeshnetError(f"gpt without a size needs {', '.join(missing)}; give them or a size "
                       f"({', '.join(GPT_SIZES)})")
  return GPTConfig(**fields)


def check_token_data(name: str, x_NxT: Any) -> None:
  """Refuses, with one line, inputs that are not token sequences: a gpt
  reads integer tokens ``[N, T]``.

  Raises:
    MeshnetError: naming the data set, its inputs' dtype and shape, and the fix.
  """
  dtype = getattr(x_NxT, "dtype", None)
  if len(getattr(x_NxT, "shape", ())) != 2 or dtype is None or not jnp.issubdtype(
      dtype, jnp.integer):
    raise MeshnetError(
        f"--model gpt reads integer token sequences [N, T], but dataset {name} has "
        f"{dtype} inputs of shape {tuple(getattr(x_NxT, 'shape', ()))}; use a token data "
        "set (--dataset text)")


def init_params(cfg: GPTConfig, key: jax.Array) -> dict[str, Any]:
  """The parameters (see the module docstring for the tree): GPT-2's init,
  normal std 0.02, the residual projections (``attn.out``, ``mlp.down``)
  ``0.02 / sqrt(2 L)``, norms at identity."""
  k_tok, k_pos, k_blocks, k_head = jax.random.split(key, 4)
  return {"embed": _embed_init(cfg, k_tok, k_pos),
          "blocks": jax.vmap(functools.partial(_block_init, cfg))(
              jax.random.split(k_blocks, cfg.layers)),
          "head": _head_init(cfg, k_head)}


def _embed_init(cfg: GPTConfig, k_tok: jax.Array, k_pos: jax.Array) -> dict[str, Any]:
  embed = {"tokens": nn.embedding_init(k_tok, cfg.vocab, cfg.width)}
  if cfg.positions == "learned":
    embed["positions"] = nn.positions_init(k_pos, cfg.context, cfg.width)
  return embed


def _block_init(cfg: GPTConfig, key: jax.Array) -> dict[str, Any]:
  out_std = 0.02 / math.sqrt(2 * cfg.layers)
  k_attn, k_mlp = jax.random.split(key)
  return {"attn_norm": nn.norm_init(cfg.width, cfg.norm),
          "attn": nn.attention_init(k_attn, cfg.width, cfg.heads, out_std=out_std),
          "mlp_norm": nn.norm_init(cfg.width, cfg.norm),
          "mlp": nn.mlp_block_init(k_mlp, cfg.width, cfg.mlp_width, out_std=out_std)}


def _head_init(cfg: GPTConfig, key: jax.Array) -> dict[str, Any]:
  head = {"norm": nn.norm_init(cfg.width, cfg.norm)}
  if not cfg.tie_embeddings:
    head["w"] = nn.normal_init(key, (cfg.width, cfg.vocab), 0.02)
  return head


def logical_axes(cfg: GPTConfig) -> dict[str, Any]:
  """Logical names of :func:`init_params`' tree: ``embed`` (the width) over
  ``fsdp``; ``heads``, ``mlp`` and ``vocab`` over ``tensor`` (Megatron pairs
  ``qkv``/``out`` and ``up``/``down``); the stacked ``[L]`` as ``layers``
  (``stage``); the per-head width ``kv`` never split."""
  norm = nn.logical_axes_of("norm", kind=cfg.norm)
  embed = {"tokens": nn.logical_axes_of("embedding")}
  if cfg.positions == "learned":
    embed["positions"] = nn.logical_axes_of("positions")
  block = _block_logical_axes(cfg)
  head = {"norm": norm}
  if not cfg.tie_embeddings:
    head["w"] = P("embed", "vocab")
  return {"embed": embed, "blocks": nn.stacked(block), "head": head}


def _block_logical_axes(cfg: GPTConfig) -> dict[str, Any]:
  """One block's names (without the stacked ``layers`` dimension)."""
  norm = nn.logical_axes_of("norm", kind=cfg.norm)
  return {"attn_norm": norm, "attn": nn.logical_axes_of("attention"),
          "mlp_norm": norm, "mlp": nn.logical_axes_of("mlp")}


def embed_apply(cfg: GPTConfig, params: dict[str, Any], tokens_BxT: jax.Array, *,
                train: bool = False, key: jax.Array | None = None) -> jax.Array:
  """Token embedding (+ learned positions, + dropout): ``int [B, T] -> [B, T, D]``.

  Raises:
    MeshnetError: tokens that are not an integer ``[B, T]`` array, or a
      ``T`` longer than the context with learned positions.
  """
  if tokens_BxT.ndim != 2 or not jnp.issubdtype(tokens_BxT.dtype, jnp.integer):
    raise MeshnetError(f"gpt takes integer tokens [B, T], got {tokens_BxT.dtype} "
                       f"{tuple(tokens_BxT.shape)}; use a token data set (--dataset text)")
  x_BxTxD = nn.embedding(params["tokens"], tokens_BxT, kind=cfg.embedding)
  if cfg.positions == "learned":
    x_BxTxD = nn.add_positions(params["positions"], x_BxTxD)
  return nn.dropout(x_BxTxD, cfg.dropout, key=key, train=train)


def block_apply(cfg: GPTConfig, params: dict[str, Any], x_BxTxD: jax.Array, *,
                train: bool = False, key: jax.Array | None = None) -> jax.Array:
  """One pre-norm block (its leaves without the ``[L]`` dimension):
  ``x + drop(attn(norm(x)))`` then ``x + drop(mlp(norm(x)))``; ``[B, T, D] -> [B, T, D]``."""
  k_attn, k_mlp = jax.random.split(key) if key is not None else (None, None)
  h = nn.causal_attention(params["attn"], nn.norm(params["attn_norm"], x_BxTxD),
                          rotary_positions=cfg.positions == "rotary", kind=cfg.attention)
  x_BxTxD = x_BxTxD + nn.dropout(h, cfg.dropout, key=k_attn, train=train)
  h = nn.mlp_block(params["mlp"], nn.norm(params["mlp_norm"], x_BxTxD))
  return x_BxTxD + nn.dropout(h, cfg.dropout, key=k_mlp, train=train)


def blocks_apply(cfg: GPTConfig, params: dict[str, Any], x_BxTxD: jax.Array, *,
                 train: bool = False, key: jax.Array | None = None,
                 keys: jax.Array | None = None) -> jax.Array:
  """The stacked blocks (leaves ``[L', ...]``, any ``L'``: a pipeline stage
  passes its slice) as one ``scan``; block ``l`` of the slice gets
  ``keys[l]`` (``keys``: ``[L']`` keys), else ``jax.random.split(key, L')[l]``.
  ``[B, T, D] -> [B, T, D]``."""
  count = jax.tree.leaves(params)[0].shape[0]
  keyed = train and cfg.dropout > 0.0
  if keyed and key is None and keys is None:
    raise MeshnetError(f"gpt dropout {cfg.dropout} needs a key when train=True")

  def body(x, inputs):
    block, k = inputs if keyed else (inputs, None)
    return block_apply(cfg, block, x, train=train, key=k), None

  if cfg.remat:
    body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
  if keyed and keys is None:
    keys = jax.random.split(key, count)
  xs = (params, keys) if keyed else params
  x_BxTxD, _ = jax.lax.scan(body, x_BxTxD, xs)
  return x_BxTxD


def head_apply(cfg: GPTConfig, params: dict[str, Any], x_BxTxD: jax.Array,
               embed: dict[str, Any] | None = None) -> jax.Array:
  """Final norm and logits: ``[B, T, D] -> [B, T, V]``. A tied head needs
  ``embed`` (the ``embed`` part of the parameters) for the token table."""
  h_BxTxD = nn.norm(params["norm"], x_BxTxD)
  if cfg.tie_embeddings:
    if embed is None:
      raise MeshnetError("a tied gpt head needs the embedding parameters (embed=...)")
    return nn.unembed(embed["tokens"], h_BxTxD)
  return jnp.einsum("btd,dv->btv", h_BxTxD, params["w"])


def apply_params(cfg: GPTConfig, params: dict[str, Any], tokens_BxT: jax.Array, *,
                 train: bool = False, key: jax.Array | None = None) -> jax.Array:
  """The whole model: ``int [B, T] -> [B, T, V]`` logits (the compute dtype;
  :mod:`meshnet.compute` casts them to float32 under ``bf16``).

  Keys are per layer, as :func:`meshnet.model.sequential` draws them for the
  ``L + 2`` layers of :func:`to_layers` (so a pipeline draws the same
  dropout masks): ``keys = jax.random.split(key, L + 2)``, the embedding
  ``keys[0]``, block ``l`` ``keys[1 + l]`` (the head has no randomness)."""
  keys = jax.random.split(key, cfg.layers + 2) if key is not None else None
  with jax.named_scope("embed"):
    x_BxTxD = embed_apply(cfg, params["embed"], tokens_BxT, train=train,
                          key=None if keys is None else keys[0])
  with jax.named_scope("blocks"):
    x_BxTxD = blocks_apply(cfg, params["blocks"], x_BxTxD, train=train,
                           keys=None if keys is None else keys[1:cfg.layers + 1])
  with jax.named_scope("head"):
    return head_apply(cfg, params["head"], x_BxTxD, params["embed"])


def gpt(size: str | None = "tiny", **options: Any) -> Model:
  """A GPT as a :class:`~meshnet.Model`: tokens ``int32 [B, T]`` (``T <=
  context``) to logits ``float32 [B, T, vocab]``.

  Examples: ``gpt("tiny")``; ``gpt("small", context=256)``;
  ``gpt(None, layers=2, heads=4, width=32, context=16)``;
  ``gpt("tiny", positions="rotary", norm="rms", tie_embeddings=True)``.

  Args:
    size: a name in :data:`GPT_SIZES`, or ``None`` to give every dimension.
    **options: fields of :class:`GPTConfig` (``layers``, ``heads``,
      ``width``, ``context``, ``vocab``, ``mlp_ratio``, ``positions``,
      ``norm``, ``tie_embeddings``, ``dropout``, ``attention``, ``remat``); ``None`` keeps
      the size's value.

  Returns:
    A Model whose ``params`` are stacked (see the module docstring) and whose
    ``logical_axes`` name every dimension (:func:`logical_axes`).
  """
  return from_config(gpt_config(size, **options))


def from_config(cfg: GPTConfig) -> Model:
  """The :func:`gpt` model of ``cfg``."""

  def init(key: jax.Array) -> dict[str, Any]:
    return init_params(cfg, key)

  def apply(params, tokens_BxT, *, train: bool = False, key: jax.Array | None = None):
    return apply_params(cfg, params, tokens_BxT, train=train, key=key)

  if cfg.tie_embeddings:  # the head reads the embedding: no cut between them
    return Model(init, apply, logical_axes=logical_axes(cfg))
  return Model(init, apply, logical_axes=logical_axes(cfg), layers=layers(cfg),
               to_layers=functools.partial(to_layers, cfg),
               from_layers=functools.partial(from_layers, cfg))


def layers(cfg: GPTConfig) -> tuple[Model, ...]:
  """The ``L + 2`` layers a pipeline cuts an untied gpt into: the
  embedding (tokens ``int [B, T] -> [B, T, D]``), ``L`` identical blocks
  (``[B, T, D] -> [B, T, D]``; one :class:`~meshnet.Model`, so a pipeline
  scans a stage's blocks and compiles equal stages once) and the head
  (``[B, T, D] -> [B, T, V]``). Their parameters are :func:`to_layers`'
  entries; each layer's ``init`` gives the right shapes (not the values of
  :func:`init_params`).

  Raises:
    MeshnetError: a tied head (it reads the embedding's table, so the
      first and last layers share a parameter).
  """
  if cfg.tie_embeddings:
    raise MeshnetError("a gpt with tie_embeddings=True has no layers to pipeline (its head "
                       "is the embedding's table); use an untied head (the default)")

  def embed_init(key):
    return _embed_init(cfg, *jax.random.split(key))

  def embed(params, tokens_BxT, *, train=False, key=None):
    return embed_apply(cfg, params, tokens_BxT, train=train, key=key)

  def block(params, x_BxTxD, *, train=False, key=None):
    return block_apply(cfg, params, x_BxTxD, train=train, key=key)

  def head(params, x_BxTxD, *, train=False, key=None):
    del train, key
    return head_apply(cfg, params, x_BxTxD)

  axes = logical_axes(cfg)
  block_layer = Model(functools.partial(_block_init, cfg), block,
                      logical_axes=_block_logical_axes(cfg))
  return (Model(embed_init, embed, logical_axes=axes["embed"]),
          *(block_layer,) * cfg.layers,
          Model(functools.partial(_head_init, cfg), head, logical_axes=axes["head"]))


def to_layers(cfg: GPTConfig, params: dict[str, Any]) -> list[Any]:
  """The parameters as :func:`layers` takes them: ``[embed, block_0, ...,
  block_{L-1}, head]``, block ``l`` the ``[l]`` slice of every ``blocks`` leaf."""
  blocks = [jax.tree.map(lambda a, l=l: a[l], params["blocks"]) for l in range(cfg.layers)]
  return [params["embed"], *blocks, params["head"]]


def from_layers(cfg: GPTConfig, per_layer: Sequence[Any]) -> dict[str, Any]:
  """Inverse of :func:`to_layers`: the blocks stacked back along ``[L]``."""
  if len(per_layer) != cfg.layers + 2:
    raise MeshnetError(f"a gpt with {cfg.layers} blocks has {cfg.layers + 2} layers, got "
                       f"{len(per_layer)} entries")
  return {"embed": per_layer[0],
          "blocks": jax.tree.map(lambda *a: jnp.stack(a), *per_layer[1:-1]),
          "head": per_layer[-1]}
