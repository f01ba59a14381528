from __future__ import annotations

import pytest

from lalm_export.errors import UnknownFamilyError
from lalm_export.families import FAMILIES, get_family
from lalm_export.models import ENCODER_CLASSES
from lalm_export.tiny import build_tiny_checkpoint


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(UnknownFamilyError, match="known families: hubert, llm, wav2vec2, whisper"):
        get_family("conformer")


def test_every_encoder_family_has_a_wrapper():
    encoders = {name for name, spec in FAMILIES.items() if spec.role == "encoder"}
    assert encoders == set(ENCODER_CLASSES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_has_a_tiny_checkpoint(family, tmp_path):
    folder = build_tiny_checkpoint(family, tmp_path / family)
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()


def test_every_family_is_exercised_by_the_tests():
    """Fails when a row is added to the registry without tests that build and run it."""
    from pathlib import Path

    tests = Path(__file__).parent
    source = "\n".join(p.read_text() for p in tests.rglob("test_*.py"))
    for family, spec in FAMILIES.items():
        if spec.role == "encoder":
            assert family in ENCODER_CLASSES, f"{family} has no wrapper, so the encoder tests skip it"
        else:
            assert "LLMDecoder" in source, f"{family} has no decoder test"
