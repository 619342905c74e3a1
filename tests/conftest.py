"""Test set-up: 8 simulated CPU devices, strict numpy rank promotion.

XLA_FLAGS must be set before JAX starts, so this runs before any test module
imports jax.
"""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# Start the backends now, so that no test's devices=N can change the count for
# the tests after it (a run asking for fewer devices then uses a subset).
assert len(jax.devices()) == 8, jax.devices()


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def digits_batches():
  """Three digits batches of 64 (``(x, y)`` numpy pairs), the same for every
  test that compares a parallel step with one device."""
  import meshnet
  ds = meshnet.load_dataset("digits")
  sampler = meshnet.BatchSampler(len(ds.x_train), 64, seed=3)
  return [(ds.x_train[i], ds.y_train[i]) for i in (next(sampler) for _ in range(3))]
