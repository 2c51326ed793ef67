"""Test-wide setup: 8 fake CPU devices, so sharding tests run on one machine.

XLA reads the flag when jax initialises its backend, so it must be set before
any test module imports jax.
"""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# Tests check correctness, not speed: skipping LLVM optimisation halves compile time.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
