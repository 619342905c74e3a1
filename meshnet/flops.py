"""Model FLOPs and MFU (model FLOPs utilisation).

Training FLOPs per token of a decoder-only transformer, PaLM's convention
(Chowdhery et al. 2022, appendix B; nanoGPT's ``estimate_mfu``)::

  6 N + 12 L H Q T

``6 N``: a forward multiply-add (2 FLOPs) per parameter per token and twice
that backward; ``12 L H Q T``: the attention scores ``Q K^T`` and ``P V``
(``2 * 2 * T * H * Q`` forward per layer, times 3 with the backward), over
the full ``T x T`` square (the causal mask's half is computed and masked).
``N`` counts the parameters that multiply activations: the blocks, the
final norm and the head's ``[D, V]`` matrix, but not the position table nor
an untied input token table (a lookup, no FLOPs). A tied table is counted
once, as the head; that is nanoGPT's count (it subtracts the position table,
keeps the tied token table). Model FLOPs leave out rematerialisation
(recomputed work is not useful work) and elementwise ops.

MFU = achieved model FLOP/s over the devices' peak: ``tokens_per_sec *
flops_per_token / (peak per device * devices)``. :data:`PEAK_FLOPS` holds
dense bfloat16 peaks per device (vendor figures).
"""

from __future__ import annotations

import dataclasses

import jax

from meshnet.errors import MeshnetError
from meshnet.hardware import match_kind

PEAK_FLOPS: dict[str, float] = {
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
    "tpu-v4": 275e12,
    "tpu-v5e": 197e12,
    "tpu-v5p": 459e12,
    "tpu-v6e": 918e12,
}
"""Dense bfloat16 peak FLOP/s per device (NVIDIA SXM datasheets without
sparsity; Google Cloud TPU per-chip figures)."""


def training_flops_per_token(n_params: float, layers: int, heads: int, head_width: int,
                             seq_len: int) -> float:
  """``6 N + 12 L H Q T``: model FLOPs to train on one token (forward and
  backward) of a sequence of ``seq_len`` tokens."""
  return 6.0 * n_params + 12.0 * layers * heads * head_width * seq_len


def gpt_matmul_params(cfg) -> int:
  """``N`` of :mod:`meshnet.models.gpt`'s model ``cfg`` (a
  :class:`~meshnet.models.gpt.GPTConfig`): every parameter but the position
  table and the input token table, plus the head's ``D x V`` (the token
  table itself when tied)."""
  d, f, layers = cfg.width, cfg.mlp_width, cfg.layers
  norm = 2 * d if cfg.norm == "layer" else d
  per_block = 3 * d * d + d * d + 2 * d * f + 2 * norm
  return layers * per_block + norm + d * cfg.vocab


def gpt_flops_per_token(cfg, seq_len: int | None = None) -> float:
  """Training FLOPs per token of the GPT ``cfg`` on sequences of ``seq_len``
  tokens (default: its context)."""
  seq_len = cfg.context if seq_len is None else seq_len
  return training_flops_per_token(gpt_matmul_params(cfg), cfg.layers, cfg.heads,
                                  cfg.head_width, seq_len)


def peak_flops(device_kind: str | None = None) -> float | None:
  """Dense bf16 peak FLOP/s of one device of ``device_kind`` (JAX's
  ``device.device_kind``, e.g. ``"NVIDIA H100 80GB HBM3"``, ``"TPU v5
  lite"``; default: this process's first device), or ``None`` when the kind
  is not in :data:`PEAK_FLOPS` (a CPU, an unknown GPU)."""
  if device_kind is None:
    device = jax.devices()[0]
    if device.platform == "cpu":
      return None
    device_kind = device.device_kind
  kind = match_kind(device_kind)
  return PEAK_FLOPS.get(kind) if kind is not None else None


def mfu(tokens_per_sec: float, flops_per_token: float, peak_flops_total: float) -> float:
  """Model FLOPs utilisation: ``tokens_per_sec * flops_per_token /
  peak_flops_total`` (the peak of all devices the tokens were processed on).

  Raises:
    MeshnetError: a peak that is not a positive number.
  """
  if not peak_flops_total > 0:
    raise MeshnetError(f"peak FLOP/s {peak_flops_total!r} must be > 0 (--peak-flops)")
  return tokens_per_sec * flops_per_token / peak_flops_total


@dataclasses.dataclass(frozen=True)
class Throughput:
  """What a run's metric records add for a token model.

  Attributes:
    tokens_per_example: tokens in one example (the sequence length ``T``).
    flops_per_token: model FLOPs to train on one token.
    peak_flops_total: peak FLOP/s of all the run's devices, or ``None`` (no
      ``mfu``).
  """

  tokens_per_example: int
  flops_per_token: float
  peak_flops_total: float | None = None

  def metrics(self, samples_per_sec: float) -> dict[str, float]:
    """``{"tokens_per_sec": ..., "mfu": ...}`` (``mfu`` only with a peak)."""
    tokens_per_sec = samples_per_sec * self.tokens_per_example
    out = {"tokens_per_sec": tokens_per_sec}
    if self.peak_flops_total is not None:
      out["mfu"] = mfu(tokens_per_sec, self.flops_per_token, self.peak_flops_total)
    return out

  def describe(self) -> str:
    """One line: FLOPs per token and what MFU is measured against."""
    text = (f"model FLOPs: {self.flops_per_token / 1e6:.3g} MFLOP per token "
            "(6N + 12LHQT, training)")
    if self.peak_flops_total is None:
      return text + "; no mfu (no known peak for this device: --peak-flops sets one)"
    return text + f"; mfu against {self.peak_flops_total / 1e12:.4g} TFLOP/s peak in all"
