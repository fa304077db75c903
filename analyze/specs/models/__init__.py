"""Bundled HF config.json files of supported MoE models (data only; see SOURCES.md).

A package so that the JSON files ship with the wheel (package-data applies per package).
"""
