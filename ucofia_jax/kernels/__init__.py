"""Optional native (XLA FFI) kernels; the pure-JAX code in ``ucofia_jax.ops`` is the reference."""
