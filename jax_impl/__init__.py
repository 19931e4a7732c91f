"""The JAX path: Pallas kernels (Pallas-Triton twins, Mosaic GPU siblings) and the JAX front."""
