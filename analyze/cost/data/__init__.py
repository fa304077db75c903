"""Bundled cost constants (cost_constants.yaml). A package so the file ships with the wheel."""
