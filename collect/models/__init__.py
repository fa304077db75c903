"""The tiny model configs shipped with moecap (`--model tiny-qwen2-moe`, `--model tiny-olmoe`).

Each is a folder `<name>/config.json` beside this file (README.md says how they were derived); they
have no weights, so they run with `--random-weights` only.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def shipped_names() -> list[str]:
    """Names of the shipped configs, sorted."""
    root = resources.files(__name__)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.joinpath("config.json").is_file())


def shipped_config(name: str) -> Path | None:
    """The config.json of the shipped model `name`, or None when no such model ships."""
    if name not in shipped_names():
        return None
    return Path(str(resources.files(__name__).joinpath(name, "config.json")))
