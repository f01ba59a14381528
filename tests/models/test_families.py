"""The registry is the one place a family lives: every row gets a wrapper, a tiny and a
base-size config, tests and a bundle, and a new row needs nothing else."""

from __future__ import annotations

import dataclasses

import pytest

from lalm_export.demo.tiny import build_tiny_checkpoint, tiny_input
from lalm_export.errors import UnknownFamilyError
from lalm_export.export.component import ExportOptions, export_bundle
from lalm_export.models import ENCODER_CLASSES, encoder_class
from lalm_export.models.families import ENCODER_FAMILIES, FAMILIES, get_family
from runtime.api import load

# Modules whose tests take the `encoder_family` fixture: every encoder row must appear in them.
PER_FAMILY_MODULES = (
    "tests/models/test_audio_encoder.py",
    "tests/export/test_component.py",
    "tests/precision/test_precision.py",
    "tests/runtime/test_infer.py",
)


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(UnknownFamilyError) as caught:
        get_family("conformer")
    assert str(caught.value).endswith("known families: " + ", ".join(sorted(FAMILIES)))


def test_every_encoder_family_has_its_wrapper_class():
    assert tuple(ENCODER_CLASSES) == ENCODER_FAMILIES
    for family, cls in ENCODER_CLASSES.items():
        assert cls.family == family and cls.__name__.endswith("AudioEncoder")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_has_a_tiny_checkpoint_and_a_base_config(family, tmp_path):
    folder = build_tiny_checkpoint(family, tmp_path / family)
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()
    spec = get_family(family)
    if spec.feature_extractor is not None:
        assert (folder / "preprocessor_config.json").is_file()
    base = spec.base.build()
    assert int(getattr(base, "hidden_size", getattr(base, "d_model", 0))) >= 512


def test_every_encoder_family_is_exercised_by_the_per_family_tests(request):
    """Fails when a module's per-family tests stop covering a registry row."""
    for module in PER_FAMILY_MODULES:
        ids = [item.nodeid for item in request.session.items if item.nodeid.startswith(module)]
        if not ids:
            continue  # that module is not part of this run
        missing = [f for f in ENCODER_FAMILIES if not any(f"[{f}]" in i or f"[{f}-" in i or f"-{f}]" in i for i in ids)]
        assert not missing, f"{module} has no test of {missing}"


def test_a_family_is_added_by_its_registry_row_alone(monkeypatch, tmp_path):
    """A row copied under a new name (no wrapper class, no code elsewhere) gets a wrapper,
    a tiny checkpoint, a verified bundle and a runtime."""
    row = dataclasses.replace(get_family("wav2vec2"), name="my-speech-encoder")
    monkeypatch.setitem(FAMILIES, row.name, row)
    cls = encoder_class(row.name)
    assert cls.__name__ == "MySpeechEncoderAudioEncoder"
    checkpoint = build_tiny_checkpoint(row.name, tmp_path / "checkpoint")
    model = cls(str(checkpoint), use_lora=True)
    assert model(tiny_input(row.name, batch=1))[-1].shape[-1] == model.get_hidden_size()
    manifest = export_bundle(ExportOptions(family=row.name, model=str(checkpoint), output=tmp_path / "bundle"), quiet=True)
    assert manifest.family == row.name and manifest.parity["passed"]
    encoded = load(tmp_path / "bundle").encode_arrays([tiny_input(row.name, batch=1).numpy()[0]])
    assert encoded[0].hidden_states.shape[-1] == model.get_hidden_size()
