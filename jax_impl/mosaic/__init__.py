"""Mosaic GPU siblings of the Pallas kernels (impl `pallas_mosaic`): TMA, wgmma, warpgroups."""
