"""Cross-stack: the Mosaic GPU kernels of jax_impl/mosaic/ on torch tensors (impl `mosaic`).

GPU only: plgpu.as_torch_kernel needs a Hopper GPU; there is no interpreter for this route.
"""
