"""Bundled data tables (gpus.yaml). A package so the files ship with the wheel."""
