"""Cross-stack: the Triton kernels of torch_impl/ called on jax arrays (impl `jax_triton`, GPU only)."""
