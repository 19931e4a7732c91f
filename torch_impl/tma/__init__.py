"""Triton Hopper kernels (impl `triton_tma`): tensor descriptors, persistent grouped grid."""
