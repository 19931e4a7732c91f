"""Cross-stack: the Triton kernels of torch_impl/ on jax arrays (impl `jax_triton`).

GPU only: jax_triton.triton_call launches compiled Triton kernels; there is no interpreter route.
"""
