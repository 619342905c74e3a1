"""Shardings of meshnet's arrays over a mesh.

Parameters and optimizer state are replicated for data parallelism
(``P()``); a batch splits its leading axis over ``data``.
"""

from __future__ import annotations

from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from meshnet.mesh import DATA


def batch_spec() -> P:
  """Spec of a batch ``[B, ...]``: ``B`` split over ``data``."""
  return P(DATA)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a global batch ``[B, ...]`` on ``mesh``."""
  return NamedSharding(mesh, batch_spec())


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())
