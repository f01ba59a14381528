"""The numpy audio front end against transformers' feature extractors."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from transformers import Wav2Vec2FeatureExtractor, WhisperFeatureExtractor

from lalm_export.parity.signals import speech_like
from runtime.audio import load_audio, log_mel, normalize_waveform
from runtime.errors import AudioError


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_whisper_feature_extractor(n_mels):
    samples = speech_like(4.0)
    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    reference = extractor(samples, sampling_rate=16_000, return_tensors="np").input_features[0]
    ours = log_mel(samples, extractor.to_dict())
    assert ours.shape == reference.shape == (n_mels, 3000)
    assert np.max(np.abs(ours - reference)) <= 1e-4


@pytest.mark.parametrize("chunk_length", [30, 2])
@pytest.mark.parametrize("fraction", [0.0001, 0.1, 0.5, 0.99, 0.9995, 1.0])
def test_log_mel_of_a_clip_shorter_than_the_window_matches_at_every_length(chunk_length, fraction):
    """Only the frames that touch the clip are computed: lengths where the clip's end meets
    the window's last frames (and its reflection) included."""
    extractor = WhisperFeatureExtractor(chunk_length=chunk_length)
    samples = speech_like(chunk_length * fraction, seed=5)
    reference = extractor(samples, sampling_rate=16_000, return_tensors="np").input_features[0]
    ours = log_mel(samples, extractor.to_dict())
    assert ours.shape == reference.shape and np.max(np.abs(ours - reference)) <= 1e-4


def test_log_mel_trims_audio_longer_than_30_s():
    samples = speech_like(31.0)
    extractor = WhisperFeatureExtractor()
    reference = extractor(samples, sampling_rate=16_000, return_tensors="np").input_features[0]
    assert np.max(np.abs(log_mel(samples, extractor.to_dict()) - reference)) <= 1e-4


def test_waveform_normalisation_matches_wav2vec2_feature_extractor():
    samples = speech_like(1.5)
    extractor = Wav2Vec2FeatureExtractor()
    reference = extractor(samples, sampling_rate=16_000, return_tensors="np").input_values[0]
    np.testing.assert_allclose(normalize_waveform(samples, extractor.to_dict()), reference, atol=1e-6)


def test_stereo_44k_flac_is_downmixed_and_resampled(tmp_path):
    left, right = speech_like(2.0, rate=44_100), speech_like(2.0, rate=44_100, seed=1)
    sf.write(tmp_path / "stereo.flac", np.stack([left, right], axis=1), 44_100)
    audio = load_audio(tmp_path / "stereo.flac")
    assert audio.source_rate == 44_100
    assert abs(len(audio.samples) - 32_000) <= 1
    assert audio.samples.dtype == np.float32


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_text("not audio at all"), "not a readable audio file"),
        (lambda p: sf.write(p, np.zeros(0, dtype=np.float32), 16_000), "empty"),
        (lambda p: sf.write(p, np.array([0.1, np.nan, 0.2] * 100, dtype=np.float32), 16_000, subtype="FLOAT"), "NaN"),
    ],
)
def test_bad_audio_files(tmp_path, make, fragment):
    path = tmp_path / "clip.wav"
    make(path)
    with pytest.raises(AudioError, match=fragment):
        load_audio(path)
