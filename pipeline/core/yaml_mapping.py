"""Reading a YAML file that must hold a mapping (run configs, model-size configs)."""

from __future__ import annotations

from pathlib import Path

import yaml

from data_prep.errors import UserError


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file that must hold a mapping; any problem is one line naming the file."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of {what}")
    return data
