"""Bundles the serving tests share: an audio LLM (tiny wav2vec2 + projector + tiny Llama),
an encoder (wav2vec2) and a decoder, exported once per session, and real audio files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lalm_export.export import ExportOptions, export_bundle
from lalm_export.export_lalm import export_lalm_bundle
from lalm_export.models import LLMDecoder, encoder_class
from lalm_export.models.lalm import LALM, ProjectorConfig
from lalm_export.options import LalmExportOptions
from lalm_export.signals import speech_like
from tests.helpers import randomize_lora


@pytest.fixture(scope="session")
def serve_bundles(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """model id -> bundle folder: `lalm`, `wav2vec2`, `llm`."""
    root = tmp_path_factory.mktemp("serve-bundles")
    encoder = encoder_class("wav2vec2")(str(checkpoints["wav2vec2"]), use_lora=True, lora_dropout=0.0)
    decoder = LLMDecoder(str(checkpoints["llm"]), use_lora=True, lora_dropout=0.0)
    randomize_lora(encoder, seed=1)
    randomize_lora(decoder, seed=2)
    LALM(encoder, decoder, ProjectorConfig(downsample=4)).save_pretrained(root / "lalm-checkpoint")
    export_lalm_bundle(LalmExportOptions(lalm=root / "lalm-checkpoint", output=root / "lalm"), quiet=True)
    for family in ("wav2vec2", "llm"):
        export_bundle(ExportOptions(family=family, model=str(checkpoints[family]), output=root / family), quiet=True)
    return {name: root / name for name in ("lalm", "wav2vec2", "llm")}


@pytest.fixture(scope="session")
def audio_files(tmp_path_factory) -> list[Path]:
    """Three speech-like wav files: two of one length (they batch), one longer; one at 8 kHz stereo."""
    root = tmp_path_factory.mktemp("audio")
    paths = []
    for index, seconds in enumerate((1.0, 1.0, 1.5)):
        path = root / f"clip{index}.wav"
        sf.write(path, speech_like(seconds, seed=index), 16_000, subtype="FLOAT")
        paths.append(path)
    stereo = np.stack([speech_like(1.2, seed=7)[::2]] * 2, axis=1)
    sf.write(root / "stereo-8k.wav", stereo, 8_000)
    return [*paths, root / "stereo-8k.wav"]
