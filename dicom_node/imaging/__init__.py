"""Imaging: series to image stacks with exact geometry, pixel decoding, resampling, masks."""
