"""How long a clip an encoder bundle takes: bounded by the memory its attention needs, which
grows with the square of the frames."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from runtime.infer import main as infer_main
from runtime.limits import MAX_RAW_AUDIO_SECONDS, audio_limits, clip_memory_bytes, frame_samples, seconds_within
from runtime.manifest import read_manifest
from tests.helpers import REPO, assert_user_error, run_main

MEASURED = REPO / "benchmarks" / "results" / "clip-memory.json"


def test_the_bound_is_above_every_measured_peak():
    """`python -m benchmarks clip-memory` measured wav2vec2-base's peaks; the runtime's bound
    must not promise a clip fits in less than it took."""
    report = json.loads(MEASURED.read_text())
    heads, hidden = report["architecture"]["num_attention_heads"], report["architecture"]["hidden_size"]
    for row in report["rows"]:
        assert clip_memory_bytes(row["frames"], heads, hidden) / 1e9 >= row["peak_above_session_gb"], row


def test_seconds_within_inverts_the_bound():
    seconds = seconds_within(6e9, heads=12, hidden=768, frame_samples=320)
    frames = seconds * 16_000 / 320
    assert clip_memory_bytes(int(frames), 12, 768) <= 6e9 < clip_memory_bytes(int(frames) + 2, 12, 768)


def test_a_smaller_memory_budget_refuses_longer_clips_with_the_length_that_fits(serve_bundles, tmp_path, capsys):
    bundle = serve_bundles["wav2vec2"]
    manifest = read_manifest(bundle)
    assert audio_limits(manifest, bundle, memory_gb=1e6).max_seconds == MAX_RAW_AUDIO_SECONDS  # memory to spare: the graphs' own limit
    limits = audio_limits(manifest, bundle, memory_gb=0.01)
    assert 1 <= limits.max_seconds < MAX_RAW_AUDIO_SECONDS and limits.memory_gb == 0.01
    clip = tmp_path / "long.wav"
    sf.write(clip, np.zeros(int((limits.max_seconds + 1) * 16_000), dtype=np.float32), 16_000)
    result = run_main(infer_main, bundle, "--audio", clip, "--output", tmp_path / "f.npz", "--max-clip-memory-gb", "0.01", capsys=capsys)
    assert_user_error(result, f"more than this bundle encodes at once ({limits.max_seconds:g} s, within 0.01 GB of memory for one clip")
    assert not (tmp_path / "f.npz").exists()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_the_memory_budget_must_be_a_positive_number(value, serve_bundles, tmp_path, capsys):
    result = run_main(
        infer_main, serve_bundles["wav2vec2"], "--audio", tmp_path / "a.wav", "--output", tmp_path / "f.npz", "--max-clip-memory-gb", value, capsys=capsys
    )
    assert_user_error(result, "--max-clip-memory-gb must be a positive number")


def test_an_audio_llm_bundle_records_what_bounds_its_clips(serve_bundles):
    encoder = read_manifest(serve_bundles["lalm"]).extra["encoder"]
    config = json.loads((serve_bundles["wav2vec2"] / "config.json").read_text())  # the same tiny wav2vec2 architecture
    assert encoder["num_attention_heads"] == config["num_attention_heads"] and encoder["frame_samples"] == frame_samples(config)
    limits = audio_limits(read_manifest(serve_bundles["lalm"]), serve_bundles["lalm"], memory_gb=0.01)
    assert limits.max_seconds < MAX_RAW_AUDIO_SECONDS


def test_long_encoder_runs_give_their_memory_back_and_short_ones_keep_the_arena():
    """ONNX Runtime's arena keeps a run's peak for the life of the process unless told to shrink
    (the figures: benchmarks/results/clip-memory.json, kept_after_gb); shrinking after every short
    run would reallocate it each time."""
    from runtime.sessions import SHRINK_ABOVE_SAMPLES, run_options_for

    assert run_options_for("raw_audio", SHRINK_ABOVE_SAMPLES + 1).get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
    assert run_options_for("raw_audio", SHRINK_ABOVE_SAMPLES) is None
    assert run_options_for("log_mel", 10 * SHRINK_ABOVE_SAMPLES) is None  # a fixed window: the arena never grows
    shrunk = run_options_for("log_mel", SHRINK_ABOVE_SAMPLES, shrink=True)  # a server's batch of windows
    assert shrunk.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"


def test_a_servers_batches_shrink_the_arena_and_an_idle_server_returns_freed_memory(serve_bundles, monkeypatch):
    """What kept a server at 3.3 GB after a 10-minute recording (docs/long-recordings.md): a batch
    of clips shrinks the encoder's arena after it, one clip keeps it (the next runs as fast); when
    the last request in flight ends, the heap's free pages go back (glibc's malloc_trim)."""
    import runtime.server.engine as engine_module
    from runtime.audio import Audio
    from runtime.server.engine import AudioJob, Engine, ServeSettings, load_models
    from runtime.sessions import SessionOptions

    trims, shrinks = [], []
    monkeypatch.setattr(engine_module, "return_freed_memory", lambda: trims.append(1))
    engine = Engine(load_models([serve_bundles["lalm"]], ["lalm"], SessionOptions(provider="cpu")), ServeSettings())
    try:
        model = engine.models["lalm"]
        encode = model.runner.encode
        monkeypatch.setattr(model.runner, "encode", lambda clips, shrink_arena=False: (shrinks.append(shrink_arena), encode(clips, shrink_arena))[1])
        clip = Audio("a", np.random.default_rng(0).standard_normal(16_000).astype(np.float32) * 0.1, 16_000)
        engine.run_audio_jobs([AudioJob(model, clip), AudioJob(model, clip)])
        engine.run_audio_jobs([AudioJob(model, clip)])
        assert shrinks == [True, False]
        first, second = engine.admit(), engine.admit()
        first()
        assert trims == []  # one still in flight
        second()
        second()  # a second call releases nothing
        assert trims == [1]
    finally:
        engine.close()
