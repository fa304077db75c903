"""moecap-mode metric formulas (docs/metrics.md): pure functions over arrays / frames."""
