"""Audio front end in numpy: decode, downmix, resample to 16 kHz, and each family's
feature extraction from the bundle's `preprocessor_config.json`."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import AudioError

TARGET_RATE = 16_000


@dataclass(frozen=True)
class Audio:
    name: str
    samples: np.ndarray  # mono float32 at TARGET_RATE
    source_rate: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / TARGET_RATE


def check_samples(samples: np.ndarray, name: str) -> np.ndarray:
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 1:
        raise AudioError(f"{name}: expected mono samples (one dimension), got shape {samples.shape}")
    if samples.size == 0:
        raise AudioError(f"{name}: the audio is empty (no samples)")
    if not np.isfinite(samples).all():
        raise AudioError(f"{name}: the audio contains NaN or infinite samples; fix or re-encode the file")
    return samples


def resample(samples: np.ndarray, rate: int, target: int = TARGET_RATE) -> np.ndarray:
    if rate == target:
        return samples
    import soxr

    return soxr.resample(samples, rate, target, quality="HQ").astype(np.float32)


def load_audio(path: str | Path, limits: Any = None) -> Audio:
    """Decode wav/flac/ogg, downmix to mono, resample to 16 kHz (soxr, high quality).
    `limits` (a bundle's `runtime.limits.AudioLimits`): longer audio is refused by its header,
    before it is decoded."""
    path = check_audio_path(path)
    if limits is not None:
        check_header(str(path), path.name, limits)
    return _decode(str(path), str(path), path.name)


def check_audio_path(path: str | Path) -> Path:
    """`path` as a Path, refused in one line when it is a folder, missing or unreadable."""
    from runtime.manifest import denied, path_state

    path = Path(path)
    state = path_state(path)
    if state == "folder":
        raise AudioError(f"audio {path} is a folder; pass the audio files in it")
    if state == "missing":
        raise AudioError(f"audio file {path} does not exist")
    if state == "denied" or not os.access(path, os.R_OK):
        raise AudioError(denied("audio file", path))
    return path


# libsndfile's container names (soundfile.info().format) for each format name a request may give.
CONTAINERS = {"wav": ("WAV", "WAVEX", "RF64", "W64"), "flac": ("FLAC",), "ogg": ("OGG",), "mp3": ("MP3",)}


def decode_audio(data: bytes, name: str, limits: Any = None, declared_format: str | None = None) -> Audio:
    """`load_audio` for the bytes of an audio file (an upload): wav, flac, ogg, and mp3 where
    libsndfile reads it. `limits`: audio longer than the bundle takes by its header is refused
    before it is decoded or resampled (a small file whose header claims a low rate is hours
    long). `declared_format` (a key of CONTAINERS): data in another container is refused."""
    import io

    if not data:
        raise AudioError(f"{name}: the audio file is empty (0 bytes)")
    if limits is not None or declared_format is not None:
        check_header(io.BytesIO(data), name, limits, declared_format)
    return _decode(io.BytesIO(data), name, name)


def check_header(source: object, name: str, limits: Any, declared_format: str | None = None) -> None:
    """Refuse audio longer than `limits` take by its header, before a byte of it is decoded (a
    small file whose header claims a low rate is hours of samples once resampled), and data in
    another container than `declared_format` says."""
    import soundfile

    try:
        info = soundfile.info(source)
    except UNREADABLE as err:
        raise unreadable(name, err) from err
    if declared_format is not None and info.format not in CONTAINERS[declared_format]:
        found = next((key for key, names in CONTAINERS.items() if info.format in names), info.format)
        raise AudioError(f"{name}: the format says {declared_format}, but the data is {found}; give the format the data has")
    if limits is not None:
        seconds = info.frames / info.samplerate if info.samplerate > 0 else float("inf")
        limits.check_duration(name, seconds, f" by its header ({info.frames} frames at {info.samplerate} Hz)")


# What libsndfile (through soundfile) raises for a file it cannot read.
UNREADABLE = (RuntimeError, TypeError, ValueError)  # soundfile.LibsndfileError is a RuntimeError


def unreadable(label: str, err: Exception) -> AudioError:
    """libsndfile's own words ("Format not recognised."), not its message naming the Python object it read."""
    reason = getattr(err, "error_string", None) or str(err)
    return AudioError(f"{label} is not a readable audio file (wav, flac or ogg expected): {reason}")


def _decode(source: object, label: str, name: str) -> Audio:
    import soundfile

    try:
        data, rate = soundfile.read(source, dtype="float32", always_2d=True)
    except UNREADABLE as err:
        raise unreadable(label, err) from err
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    mono = check_samples(mono, label)
    return Audio(name=name, samples=check_samples(resample(mono, rate), label), source_rate=int(rate))


# --- Wav2Vec2 / HuBERT ------------------------------------------------------------------


def normalize_waveform(samples: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """Wav2Vec2FeatureExtractor: zero mean, unit variance per utterance when `do_normalize`."""
    if not config.get("do_normalize", True):
        return samples.astype(np.float32)
    return ((samples - samples.mean()) / np.sqrt(samples.var() + 1e-7)).astype(np.float32)


# --- Whisper log-mel ------------------------------------------------------------------------


def _hertz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    freq = np.asarray(freq, dtype=np.float64)
    logstep = 27.0 / np.log(6.4)
    return np.where(freq >= 1000.0, 15.0 + np.log(np.maximum(freq, 1e-10) / 1000.0) * logstep, 3.0 * freq / 200.0)


def _mel_to_hertz(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    logstep = np.log(6.4) / 27.0
    return np.where(mels >= 15.0, 1000.0 * np.exp(logstep * (mels - 15.0)), 200.0 * mels / 3.0)


@functools.lru_cache(maxsize=8)
def mel_filters(n_fft: int, n_mels: int, rate: int, max_hz: float = 8000.0) -> np.ndarray:
    """Slaney-normalised triangular filters `(1 + n_fft // 2, n_mels)`, as transformers builds
    them (cached: one bundle's front end asks for the same ones every call; read-only)."""
    fft_freqs = np.linspace(0, rate // 2, 1 + n_fft // 2)
    filter_freqs = _mel_to_hertz(np.linspace(_hertz_to_mel(0.0), _hertz_to_mel(max_hz), n_mels + 2))
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    diff = np.diff(filter_freqs)
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    filters *= (2.0 / (filter_freqs[2 : n_mels + 2] - filter_freqs[:n_mels]))[None, :]
    filters.setflags(write=False)
    return filters


def log_mel(samples: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """WhisperFeatureExtractor: pad/trim to the chunk, |STFT|², mel, log10, clamp, scale.

    A short clip in a long window (2 s in Whisper's 30 s) leaves the frames past the clip
    reading zeros only: their power is exactly 0, so only the frames that touch the clip are
    computed, with the same result to the bit (2 s in a 30 s window: 34 ms -> 1.2-4 ms here)."""
    n_fft, hop = int(config.get("n_fft", 400)), int(config.get("hop_length", 160))
    n_samples = int(config.get("n_samples", 480_000))
    n_mels, rate = int(config.get("feature_size", 80)), int(config.get("sampling_rate", TARGET_RATE))
    pad, length = n_fft // 2, min(len(samples), n_samples)
    frames = 1 + (n_samples + 2 * pad - n_fft) // hop  # of the reflect-padded window
    live = frames if length + 2 * pad >= n_samples else min(frames, -(-(length + pad) // hop))
    # The window's samples the live frames read, zeros after the clip (at least `pad` of them
    # when frames are left out, so the right reflection is zeros as in the whole window).
    audio = np.zeros(n_samples if live == frames else (live - 1) * hop + n_fft - pad, dtype=np.float64)
    audio[:length] = samples[:length]
    padded = np.pad(audio, pad, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    index = np.arange(n_fft)[None, :] + hop * np.arange(live)[:, None]
    power = np.abs(np.fft.rfft(padded[index] * window, n=n_fft, axis=1)) ** 2
    spec = np.full((n_mels, frames), -10.0)  # log10 of the 1e-10 floor: zero power
    spec[:, :live] = np.log10(np.maximum(mel_filters(n_fft, n_mels, rate).T @ power.T, 1e-10))
    spec = spec[:, :-1]
    spec = np.maximum(spec, spec.max() - 8.0)
    return ((spec + 4.0) / 4.0).astype(np.float32)


# --- Granite Speech's stacked log-mel ---------------------------------------------------------


@functools.lru_cache(maxsize=8)
def htk_mel_filters(n_fft: int, n_mels: int, rate: int) -> np.ndarray:
    """HTK-scale triangular filters `(1 + n_fft // 2, n_mels)` from 0 Hz to Nyquist, unnormalised,
    as torchaudio's MelSpectrogram builds them by default (read-only)."""
    fft_freqs = np.linspace(0, rate // 2, 1 + n_fft // 2)
    top = 2595.0 * np.log10(1.0 + (rate / 2) / 700.0)
    filter_freqs = 700.0 * (10.0 ** (np.linspace(0.0, top, n_mels + 2) / 2595.0) - 1.0)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    diff = np.diff(filter_freqs)
    filters = np.maximum(0.0, np.minimum(-slopes[:, :-2] / diff[:-1], slopes[:, 2:] / diff[1:]))
    filters.setflags(write=False)
    return filters


def stacked_log_mel(samples: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """GraniteSpeechFeatureExtractor: torchaudio's MelSpectrogram (centred, reflect-padded,
    a Hann window of `win_length` in an FFT of `n_fft`), log10, clamped to 8 below the clip's
    maximum, scaled; an odd last frame dropped and each two frames stacked: `(frames // 2, 2 * n_mels)`."""
    mel = config.get("melspec_kwargs", {})
    n_fft, hop = int(mel.get("n_fft", 512)), int(mel.get("hop_length", 160))
    win, n_mels, rate = int(mel.get("win_length", 400)), int(mel.get("n_mels", 80)), int(mel.get("sample_rate", TARGET_RATE))
    if len(samples) <= n_fft // 2:
        raise AudioError(f"{len(samples)} samples is too short for this bundle's front end (an FFT of {n_fft}); pass a longer clip")
    padded = np.pad(samples.astype(np.float64), n_fft // 2, mode="reflect")
    window = np.zeros(n_fft)
    left = (n_fft - win) // 2
    window[left : left + win] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)  # periodic Hann, centred in the FFT
    frames = 1 + len(samples) // hop
    index = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    power = np.abs(np.fft.rfft(padded[index] * window, n=n_fft, axis=1)) ** 2
    logmel = np.log10(np.maximum(power @ htk_mel_filters(n_fft, n_mels, rate), 1e-10))
    logmel = np.maximum(logmel, logmel.max() - 8.0) / 4.0 + 1.0
    logmel = logmel[: frames - frames % 2]
    return logmel.reshape(-1, 2 * n_mels).astype(np.float32)


def features_for(input_kind: str, samples: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """One utterance's model input: log-mel `(n_mels, frames)`, stacked log-mel `(frames, 2 * n_mels)` or normalised samples."""
    if input_kind == "log_mel":
        return log_mel(samples, config)
    if input_kind == "raw_audio":
        return normalize_waveform(samples, config)
    if input_kind == "stacked_log_mel":
        return stacked_log_mel(samples, config)
    raise AudioError(f"the bundle's input kind {input_kind!r} takes no audio")


# Fields of a bundle's preprocessor_config.json the features are computed from, with the
# range a hand edit cannot leave (a hop of 0 divides by zero; a huge window allocates it).
_LOG_MEL_FIELDS = {"n_fft": (16, 1 << 14), "hop_length": (1, 1 << 14), "feature_size": (1, 1024), "n_samples": (1, TARGET_RATE * 3600)}
_STACKED_FIELDS = {"n_fft": (16, 1 << 14), "win_length": (1, 1 << 14), "hop_length": (1, 1 << 14), "n_mels": (1, 1024)}


def check_feature_config(config: dict[str, Any], input_kind: str, where: str) -> None:
    """A bundle's feature settings, refused in one line (BundleError) when out of range."""
    from runtime.errors import BundleError
    from runtime.manifest import is_whole_number

    rate = config.get("sampling_rate", TARGET_RATE)
    if rate != TARGET_RATE:
        raise BundleError(f"{where}: sampling_rate {rate!r}, where lalm-export writes {TARGET_RATE}; export the bundle again")
    if input_kind == "log_mel":
        fields, values, prefix = _LOG_MEL_FIELDS, config, ""
    elif input_kind == "stacked_log_mel":
        fields, values, prefix = _STACKED_FIELDS, config.get("melspec_kwargs", {}), "melspec_kwargs."
        if not isinstance(values, dict):
            raise BundleError(f"{where}: melspec_kwargs must be an object; export the bundle again")
    else:
        return
    for name, (low, high) in fields.items():
        value = values.get(name)
        if value is not None and not is_whole_number(value, low, high):
            raise BundleError(f"{where}: {prefix}{name} {value!r} is not a whole number from {low} to {high}; export the bundle again")


def groups_by_shape(inputs: Sequence[np.ndarray], largest: int | None = None) -> list[list[int]]:
    """Indices of the encoder inputs that can run as one batch: those of one shape, in order,
    at most `largest` together. The graphs take no attention mask, so padding clips together
    would change their features."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, features in enumerate(inputs):
        groups.setdefault(features.shape, []).append(index)
    return [group[at : at + (largest or len(group))] for group in groups.values() for at in range(0, len(group), largest or len(group))]
