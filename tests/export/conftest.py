"""Tiny checkpoints of the supported audio-LLM architectures and their bundles, each built and
exported once per session, when a test first asks for it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from lalm_export.cli import main as export_main
from tests.export.tiny_checkpoints import ARCHITECTURES


@pytest.fixture(scope="session")
def tiny_lalm(tmp_path_factory) -> Callable[[str], tuple[Path, Path]]:
    """`tiny_lalm(model_type)` -> (checkpoint, the bundle `lalm-export --lalm` made of it)."""
    built: dict[str, tuple[Path, Path]] = {}

    def get(model_type: str) -> tuple[Path, Path]:
        if model_type not in built:
            root = tmp_path_factory.mktemp(model_type)
            checkpoint = ARCHITECTURES[model_type].save(root, 0)
            assert export_main(["--lalm", str(checkpoint), "--output", str(root / "bundle"), "-q"]) == 0
            built[model_type] = checkpoint, root / "bundle"
        return built[model_type]

    return get
