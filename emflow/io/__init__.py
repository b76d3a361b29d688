"""Readers (PNG, TIFF, JPEG) and writers (neuroglancer precomputed, OME-Zarr)."""
