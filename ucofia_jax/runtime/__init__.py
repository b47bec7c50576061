"""Devices and processes: jax.distributed set-up, the mesh and batch sharding."""
