"""Bundled data of the what-if model (priors.yaml). A package so the files ship with the wheel."""
