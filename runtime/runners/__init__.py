"""The runners: one per kind of bundle (encoder, decoder, audio LLM) over shared bundle
opening (`bundle.py`), and the requests every front end builds (`requests.py`). `load` picks
the runner a bundle's manifest names."""

from __future__ import annotations

from pathlib import Path

from runtime.cpu import warn_on_int8_kernel_mismatch
from runtime.manifest import read_manifest
from runtime.runners.decoder import TextGenerator
from runtime.runners.encoder import EncoderRunner
from runtime.runners.lalm import LalmRunner, load_lalm
from runtime.sessions import SessionOptions


def load(folder: str | Path, options: SessionOptions | None = None) -> EncoderRunner | TextGenerator | LalmRunner:
    """An encoder runner, a text generator or (LALM bundles) an audio-to-text runner for the bundle in `folder`."""
    options = options or SessionOptions()
    manifest = read_manifest(folder)
    warn_on_int8_kernel_mismatch(manifest.int8_record(), folder)
    if manifest.role == "lalm":
        return load_lalm(Path(folder), manifest, options)
    return EncoderRunner(folder, options) if manifest.role == "encoder" else TextGenerator(folder, options)
