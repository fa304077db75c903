"""The bundled model-config registry, and loading a config.json from a path or a registry name."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError, SpecError

if TYPE_CHECKING:
    from .model import ModelSpec

_PACKAGE = "moecap.analyze.specs.models"


def _registry_files() -> dict[str, str]:
    """Registry name ("org/name") -> bundled file name."""
    files = resources.files(_PACKAGE)
    return {
        entry.name.removesuffix(".json").replace("__", "/", 1): entry.name
        for entry in files.iterdir()
        if entry.name.endswith(".json")
    }


def list_registry() -> list[str]:
    """HF ids of the bundled configs, sorted case-insensitively (e.g. "Qwen/Qwen1.5-MoE-A2.7B")."""
    return sorted(_registry_files(), key=str.casefold)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read model config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"model config {path} is not a JSON object")
    return data


def load_model_config(name_or_path: str | Path) -> dict[str, Any]:
    """A config.json as a dict, from a file path, a directory holding config.json, or a registry
    name (HF id "org/name" or file stem "org__name", case-insensitive, ".json" optional).

    Raises SpecError for a name that is neither an existing path nor in the registry, InputError
    for an unreadable or malformed file.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SpecError(f"directory {path} has no config.json")
        return _read_json(path / "config.json")
    if path.is_file():
        return _read_json(path)
    key = str(name_or_path).strip().removesuffix(".json").replace("__", "/", 1).casefold()
    for name, filename in _registry_files().items():
        if name.casefold() == key:
            text = resources.files(_PACKAGE).joinpath(filename).read_text(encoding="utf-8")
            data: dict[str, Any] = json.loads(text)
            return data
    raise SpecError(
        f"unknown model {str(name_or_path)!r}: not a path to a config.json (or a directory holding one) and not "
        f"in the bundled registry: {', '.join(list_registry())}"
    )


def load_model_spec(name_or_path: str | Path, **kwargs: Any) -> ModelSpec:
    """`model_spec_from_config(load_model_config(name_or_path), **kwargs)`."""
    from .model import model_spec_from_config  # reading a config alone needs no model formulas

    return model_spec_from_config(load_model_config(name_or_path), **kwargs)
