"""Paths of the files shipped inside the package: the demo model and its sample input."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"


def demo_model_dir() -> Path:
    return ASSETS / "demo_model"


def demo_input_path() -> Path:
    return ASSETS / "demo_input" / "sample.parquet"
