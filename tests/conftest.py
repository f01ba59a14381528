"""Shared fixtures: tiny random checkpoints of every family, built once per session and
loaded through the real `from_pretrained` path. Nothing touches the network."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from lalm_export.families import ENCODER_FAMILIES, FAMILIES  # noqa: E402
from lalm_export.tiny import build_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family -> folder of a tiny random checkpoint."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: build_tiny_checkpoint(family, root / family, seed=index) for index, family in enumerate(FAMILIES)}


@pytest.fixture(params=ENCODER_FAMILIES)
def encoder_family(request: pytest.FixtureRequest) -> str:
    """Every encoder row of the registry: a new row is tested by the encoder tests at once."""
    return request.param


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)
