"""Text from a byte-level language model: :func:`generate` and ``meshnet sample``.

Decoding keeps a fixed window of the model's ``context`` tokens: while the
text is shorter, the window holds it from position 0 and the next token is
read at its last real position (a causal model ignores the unused positions
after it); once longer, the window is the last ``context`` tokens. Every
new token recomputes the whole window (no key/value cache): one compiled
forward of ``[1, context]`` per token, all inside one jitted loop.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from meshnet.errors import MeshnetError
from meshnet.model import Model, Params


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_options(n: Any, temperature: Any, top_k: Any) -> None:
  """Refuses a bad token count, temperature or top-k (one line each)."""
  if not _is_int(n) or n < 1:
    raise MeshnetError(f"tokens={n!r} must be an integer >= 1 (--tokens N: bytes to generate)")
  if (not isinstance(temperature, numbers.Real) or isinstance(temperature, bool)
      or not math.isfinite(temperature) or temperature < 0):
    raise MeshnetError(f"temperature={temperature!r} must be a finite number >= 0 (0: "
                       "greedy, the most likely byte each time)")
  if top_k is not None and (not _is_int(top_k) or top_k < 1):
    raise MeshnetError(f"top_k={top_k!r} must be an integer >= 1 (or None: every token)")


def _pick(logits_V: jax.Array, key: jax.Array, temperature: float,
          top_k: int | None) -> jax.Array:
  """One token from ``[V]`` logits: the argmax at temperature 0, else a draw
  from ``softmax(logits / temperature)`` over the ``top_k`` largest."""
  if temperature == 0:
    return jnp.argmax(logits_V).astype(jnp.int32)
  logits_V = logits_V.astype(jnp.float32) / temperature
  if top_k is not None and top_k < logits_V.shape[0]:
    values_K, index_K = jax.lax.top_k(logits_V, top_k)  # ties: the lower index first
    return index_K[jax.random.categorical(key, values_K)].astype(jnp.int32)
  return jax.random.categorical(key, logits_V).astype(jnp.int32)


def generate(model: Model, params: Params, prompt_tokens: Any, n: int, *,
             temperature: float = 1.0, top_k: int | None = None,
             key: jax.Array | None = None, context: int) -> jax.Array:
  """``n`` tokens that continue ``prompt_tokens``, one at a time.

  Args:
    model: a causal sequence model: ``apply(params, x [B, T] int32) -> [B, T,
      V]`` logits whose position ``t`` depends on ``x[:, :t + 1]`` only.
    params: its parameters.
    prompt_tokens: ``[P]`` ints (``P >= 1``; bytes for a byte-level model).
      Longer than ``context``: only its last ``context`` tokens are seen.
    n: tokens to generate (``>= 1``).
    temperature: 0 picks the most likely token (greedy, no key needed);
      above 0 draws from ``softmax(logits / temperature)``.
    top_k: draw only among the ``top_k`` most likely tokens (``None``: all);
      ``top_k=1`` is greedy.
    key: a ``jax.random.key``; needed when ``temperature > 0``. Token ``i``
      is drawn with ``fold_in(key, i)``, so a key reproduces its text.
    context: the window the model reads (its training context).

  Returns:
    ``[n]`` int32: the new tokens only (not the prompt).

  Raises:
    MeshnetError: an empty or non-1-D prompt, ``n < 1``, ``temperature < 0``,
      ``top_k < 1``, ``context < 1``, or no key for sampling.
  """
  _check_options(n, temperature, top_k)
  if not _is_int(context) or context < 1:
    raise MeshnetError(f"context={context!r} must be an integer >= 1 (the model's window)")
  prompt = np.asarray(prompt_tokens)
  if prompt.ndim != 1 or prompt.size == 0 or not np.issubdtype(prompt.dtype, np.integer):
    raise MeshnetError(f"prompt_tokens must be a non-empty 1-D array of token ids, got "
                       f"{prompt.dtype} {prompt.shape}; give at least one token")
  if temperature > 0 and key is None:
    raise MeshnetError("sampling (temperature > 0) needs key=jax.random.key(seed); "
                       "temperature=0 is greedy and needs none")
  key = jax.random.key(0) if key is None else key
  length = len(prompt)
  buffer = np.zeros(max(length + n, context), np.int32)
  buffer[:length] = prompt

  @jax.jit
  def run(params, tokens_L, key):
    def one_token(i, tokens_L):
      known = length + i  # tokens in the text so far
      start = jnp.maximum(known - context, 0)
      window_1xT = jax.lax.dynamic_slice(tokens_L, (start,), (context,))[None]
      logits_V = model.apply(params, window_1xT, train=False)[0, known - 1 - start]
      token = _pick(logits_V, jax.random.fold_in(key, i), temperature, top_k)
      return tokens_L.at[known].set(token)

    tokens_L = jax.lax.fori_loop(0, n, one_token, tokens_L)
    return jax.lax.dynamic_slice(tokens_L, (length,), (n,))

  return run(params, jnp.asarray(buffer), key)


class Sample(NamedTuple):
  """What :func:`sample_checkpoint` returns.

  Attributes:
    prompt: the prompt's UTF-8 bytes.
    continuation: the generated bytes (exactly the number asked for).
    step: the checkpoint step the parameters came from.
  """

  prompt: bytes
  continuation: bytes
  step: int

  @property
  def text(self) -> str:
    """Prompt and continuation as text (a byte that is not valid UTF-8
    where it stands shows as U+FFFD)."""
    return (self.prompt + self.continuation).decode("utf-8", errors="replace")


def _model_config(saved: Any, directory: str):
  """The :class:`~meshnet.config.Config` holding the checkpoint's model section."""
  from meshnet.config import Config, ModelConfig

  section = saved.get("model") if isinstance(saved, dict) else None
  if not isinstance(section, dict):
    raise MeshnetError(f"checkpoint {directory} keeps no model config; sample it from Python "
                       "with meshnet.sample.generate(model, params, ...)")
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in section.items()
            if k in names}
  return Config(model=ModelConfig(**fields))


def load_text_model(directory: str, *, step: int | None = None,
                    model: Model | None = None) -> tuple[Model, Params, int, int]:
  """The byte-level language model of a ``meshnet train --dataset text``
  checkpoint, its parameters (on one device), its context and the step.

  The model is rebuilt from the config the checkpoint keeps (the built-in
  model ``meshnet train`` built), or is ``model`` when given (a custom model
  passed to :func:`meshnet.train.run`). Its parameter tree must be the
  checkpoint's, and it must map ``[1, context]`` tokens to ``[1, context,
  256]`` logits.

  Args:
    directory: the checkpoint directory (``--checkpoint-dir`` of the run).
    step: which checkpoint (default: the newest whose meta reads).
    model: the model, instead of the one the config names.

  Returns:
    ``(model, params, context, step)``.

  Raises:
    MeshnetError: no checkpoint, a checkpoint of another kind of data set,
      or a model that does not fit it (one line each).
  """
  from meshnet import checkpoint
  from meshnet.data import TEXT_VOCAB
  from meshnet.train import build_model

  step, meta = checkpoint.newest_meta(directory, step)
  data = meta.get("data")
  corpus = data.get("corpus") if isinstance(data, dict) else None
  if not isinstance(corpus, dict) or not isinstance(corpus.get("context"), int):
    dataset = ((meta.get("config") or {}).get("data") or {}).get("dataset", "unknown")
    raise MeshnetError(
        f"checkpoint {directory} (step {step}) was trained on dataset {dataset!r}, not "
        "text: meshnet sample needs a byte-level language model (meshnet train --dataset "
        "text)")
  context = corpus["context"]
  config = _model_config(meta.get("config"), directory)
  if model is None:
    model = build_model(config, context, TEXT_VOCAB)
  abstract = jax.eval_shape(model.init, jax.random.key(0))
  tokens = jax.ShapeDtypeStruct((1, context), jnp.int32)
  out = jax.eval_shape(lambda p, x: model.apply(p, x, train=False), abstract, tokens)
  if checkpoint.tree_summary(abstract) != meta["params"]:
    raise MeshnetError(
        f"checkpoint {directory} (step {step}) holds other parameters than model "
        f"{config.model.name!r} that its config names (was it trained with a custom model? "
        "pass it: meshnet.sample.sample_checkpoint(DIR, ..., model=MODEL))")
  if tuple(getattr(out, "shape", ())) != (1, context, TEXT_VOCAB):
    raise MeshnetError(
        f"the model of checkpoint {directory} maps tokens [1, {context}] to "
        f"{tuple(getattr(out, 'shape', ()))}, not next-byte logits [1, {context}, "
        f"{TEXT_VOCAB}]; meshnet sample needs a token model such as --model gpt")
  restored = checkpoint.load_params(directory, step)
  params = jax.tree.unflatten(jax.tree.structure(abstract), jax.tree.leaves(restored))
  return model, params, context, step


def sample_checkpoint(directory: str, prompt: str, tokens: int, *,
                      temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
                      step: int | None = None, model: Model | None = None) -> Sample:
  """``meshnet sample``: ``tokens`` bytes that continue ``prompt``, from the
  model of a ``--dataset text`` checkpoint (:func:`load_text_model`;
  decoding: :func:`generate` with ``key = jax.random.key(seed)``).

  Raises:
    MeshnetError: bad options (checked before the checkpoint is read), an
      empty prompt, or a checkpoint :func:`load_text_model` refuses.
  """
  _check_options(tokens, temperature, top_k)
  prompt_bytes = prompt.encode("utf-8")
  if not prompt_bytes:
    raise MeshnetError("the prompt is empty; give --prompt TEXT of at least one character")
  model, params, context, step = load_text_model(directory, step=step, model=model)
  new = generate(model, params, np.frombuffer(prompt_bytes, np.uint8).astype(np.int32),
                 tokens, temperature=temperature, top_k=top_k,
                 key=jax.random.key(seed), context=context)
  return Sample(prompt_bytes, bytes(np.asarray(new, np.uint8)), step)
