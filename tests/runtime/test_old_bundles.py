"""Bundles written by lalm-export on transformers 4.57.6 (Optimum's graphs, onnxruntime-genai
0.13's fused graph, an audio LLM) run on today's runtime and give what the runtime of that
day gave: the format did not change with the move to transformers 5 (docs/transformers5.md).
The bundles and their outputs were recorded with commit fff5f73."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lalm_export.parity.signals import speech_like
from runtime.api import load
from runtime.generation import GenerationOptions
from tests.helpers import OLD_BUNDLES

OLD = OLD_BUNDLES
EXPECTED = json.loads((OLD / "expected.json").read_text(encoding="utf-8"))
OPTIONS = GenerationOptions(max_new_tokens=16, stop_at_eos=False)


def test_an_old_encoder_bundle_gives_the_features_it_gave():
    manifest = json.loads((OLD / "hubert" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["libraries"]["transformers"] == "4.57.6" and "optimum-onnx" in manifest["libraries"]
    features = load(OLD / "hubert").encode_arrays([speech_like(1.0, seed=0)])[0].hidden_states
    expected = np.load(OLD / "hubert-features.npy")
    assert features.shape == expected.shape
    assert np.abs(features - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize("bundle", ["llm-fused", "llm-optimum"])
def test_an_old_decoder_bundle_generates_the_tokens_it_generated(bundle):
    completions = load(OLD / bundle).complete(["hello world", "the"], OPTIONS)
    assert [list(map(int, c.tokens)) for c in completions] == EXPECTED[bundle]


def test_an_old_audio_llm_bundle_transcribes_as_it_did():
    clips = [speech_like(1.0, seed=0), speech_like(1.0, seed=7)]
    assert [list(map(int, t.tokens)) for t in load(OLD / "lalm").transcribe(clips, options=OPTIONS)] == EXPECTED["lalm"]
