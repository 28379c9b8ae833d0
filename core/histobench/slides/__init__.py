"""Whole-slide image reading, tissue detection, tiling and synthetic slides."""
