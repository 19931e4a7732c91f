"""Cross-stack: the Mosaic GPU kernels of jax_impl/mosaic/ called on torch tensors (impl `mosaic`, GPU only)."""
