"""Shared fixtures: tiny random checkpoints of every family, built once per session and
loaded through the real `from_pretrained` path; the bundles and audio files the serving
tests and the load benchmark share. Nothing touches the network."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from lalm_export.demo.tiny import build_tiny_checkpoint  # noqa: E402
from lalm_export.export.component import ExportOptions, export_bundle  # noqa: E402
from lalm_export.export.lalm import export_lalm_bundle  # noqa: E402
from lalm_export.export.options import LalmExportOptions  # noqa: E402
from lalm_export.models import LLMDecoder, encoder_class  # noqa: E402
from lalm_export.models.families import ENCODER_FAMILIES, FAMILIES  # noqa: E402
from lalm_export.models.lalm import LALM, ProjectorConfig  # noqa: E402
from lalm_export.parity.signals import speech_like  # noqa: E402
from tests.helpers import randomize_lora  # noqa: E402


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
