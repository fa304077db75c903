"""moecap-mode metric formulas (metrics.md §8): pure functions over arrays / frames."""
