"""Small shared helpers: atomic file writes, image grids, seeds and devices."""
