"""Loaders of the data shipped with the tasks (see SOURCES.md beside this file)."""
from __future__ import annotations

from pathlib import Path


def find_split_file(folder: Path, stem: str, dataset: str, split: str, default: Path) -> Path:
    """``folder/<stem>.gz`` if present, else ``folder/<stem>``; one clear error naming both paths
    (and the shipped copy) when neither exists."""
    gz, plain = folder / f"{stem}.gz", folder / stem
    if gz.is_file():
        return gz
    if plain.is_file():
        return plain
    raise FileNotFoundError(
        f"{dataset} {split} split not found: neither {gz} nor {plain} exists (data_dir={str(folder)!r}; "
        f"set the task option data_dir to another copy; the shipped copy is {default})"
    )
