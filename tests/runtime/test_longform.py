"""Recordings longer than the window: a recording of several minutes (espeak-ng sentences in six
voices between silences, at 22.05 kHz) through the Python API, runtime.infer, runtime.batch, the
server (the openai SDK) and the Ray deployment's handle: segments in order, covering the speech,
none longer than a piece, each piece's text the runtime's text for that piece alone. The planning
rules, the overlap's joined text and the subtitle formats on their own. espeak-ng is installed by
the Makefile's setup and `.ci/run`."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import openai
import pytest
import soundfile as sf

from runtime.api import load
from runtime.audio import resample
from runtime.batch import main as batch_main
from runtime.generation import GenerationOptions
from runtime.infer import main as infer_main
from runtime.longform import (
    OVERLAP_SECONDS,
    Piece,
    Recording,
    Segment,
    joined_text,
    plan_pieces,
    speech_regions,
)
from runtime.server.app import subtitles
from runtime.server.engine import Engine, ServeSettings, load_models
from runtime.server.ray_serve import transcribe_bytes
from runtime.sessions import SessionOptions
from runtime.vad import FRAME, EnergyVad, SileroVad
from tests.helpers import assert_user_error, run_main
from tests.runtime.serving import running_server

TOKENS = 6
RATE = 22_050
SENTENCES = [
    "The weather is mild today and the river runs slowly past the mill.",
    "Please send the report to the office before noon on Friday.",
    "A small boat drifted across the lake while the children watched.",
    "We will meet again next week to talk about the new plan.",
]
pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt-get install espeak-ng; .ci/run installs it)")


@pytest.fixture(scope="module")
def spoken(tmp_path_factory) -> tuple[Path, list[tuple[float, float]]]:
    """A recording of about three minutes and where its sentences are (seconds)."""
    root = tmp_path_factory.mktemp("long")
    rng = np.random.default_rng(0)
    parts, placed, at = [np.zeros(int(1.5 * RATE), np.float32)], [], 1.5
    for index in range(24):
        wav = root / f"s{index}.wav"
        voice = f"en+{'mf'[index % 2]}{index % 6 + 1}"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(150 + 10 * (index % 4)), "-w", str(wav), SENTENCES[index % 4]], check=True)
        speech, rate = sf.read(wav, dtype="float32")
        speech = resample(speech, rate, RATE) * 0.8
        pause = float(rng.choice([0.4, 2.5, 4.0]))
        parts += [speech, np.zeros(int(pause * RATE), np.float32)]
        placed.append((at, at + len(speech) / RATE))
        at += len(speech) / RATE + pause
    path = root / "meeting.wav"
    sf.write(path, np.concatenate(parts), RATE, subtype="PCM_16")
    return path, placed


def check_segments(segments: list[dict], placed: list[tuple[float, float]], longest: float) -> None:
    starts = [s["start"] for s in segments]
    assert starts == sorted(starts) and [s["id"] for s in segments] == list(range(len(segments)))
    assert all(0 < s["end"] - s["start"] <= longest + 1e-6 for s in segments)
    for begin, end in placed:  # every sentence is (mostly) inside the segments
        covered = sum(max(0.0, min(end, s["end"]) - max(begin, s["start"])) for s in segments)
        assert covered >= 0.9 * (end - begin), (begin, end, segments)
    assert sum(s["end"] - s["start"] for s in segments) < placed[-1][1] - placed[0][0]  # silence skipped


def test_a_long_recording_is_transcribed_piece_by_piece_through_the_api(serve_bundles, spoken):
    path, placed = spoken
    runner = load(serve_bundles["lalm"])
    options = GenerationOptions(max_new_tokens=TOKENS)
    assert Recording.of(path).seconds > runner.limits.max_seconds
    seen = []
    result = runner.transcribe(path, None, options, split="vad", on_piece=lambda name, done, total: seen.append((done, total)))[0]
    longest = runner.piece_seconds(runner.facts["prompt"], options)
    check_segments([vars(s) for s in result.segments], placed, longest)
    assert seen[0] == (0, len(result.segments)) and seen[-1] == (len(result.segments), len(result.segments))
    assert result.tokens == [t for s in result.segments for t in s.tokens] and result.audio_s == round(Recording.of(path).seconds, 3)
    recording = Recording.of(path)
    for segment in result.segments:  # each piece's text is the runtime's for that piece alone
        alone = runner.transcribe(recording.span(round(segment.start * 16000), round(segment.end * 16000)), None, options)[0]
        assert (alone.text.strip(), alone.tokens) == (segment.text, segment.tokens)


def test_infer_batch_and_the_server_give_the_same_segments(serve_bundles, spoken, capsys, tmp_path):
    path, placed = spoken
    bundle = serve_bundles["lalm"]
    result = run_main(infer_main, bundle, "--audio", path, "--max-new-tokens", TOKENS, "--json", "-q", capsys=capsys)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.splitlines()[0])
    assert len(record["segments"]) > 10
    check_segments(record["segments"], placed, 48.0)
    output = tmp_path / "t.jsonl"
    result = run_main(batch_main, bundle, "--input", path, "--output", output, "--max-new-tokens", TOKENS, "-q", capsys=capsys)
    assert result.returncode == 0, result.stderr
    batched = json.loads(output.read_text().splitlines()[0])
    assert (batched["text"], batched["segments"]) == (record["text"], record["segments"]) and batched["elapsed_s"] > 0
    with running_server({"lalm": bundle}, ServeSettings(max_new_tokens=TOKENS)) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with open(path, "rb") as handle:
            verbose = client.audio.transcriptions.create(model="lalm", file=handle, response_format="verbose_json")
        with open(path, "rb") as handle:
            srt = client.audio.transcriptions.create(model="lalm", file=handle, response_format="srt")
    assert verbose.text == record["text"] and verbose.duration == record["audio_s"]
    assert [(s.id, s.start, s.end, s.text, s.tokens) for s in verbose.segments] == [
        (s["id"], s["start"], s["end"], s["text"], s["tokens"]) for s in record["segments"]
    ]
    assert srt == subtitles([Segment(**s) for s in record["segments"]], "srt")
    engine = Engine(load_models([bundle], ["lalm"], SessionOptions(provider="cpu")), ServeSettings())
    try:  # the Ray deployment's handle (its request path; Ray itself: test_ray.py)
        handle = asyncio.run(transcribe_bytes(engine, "lalm", path.read_bytes(), None, TOKENS))
    finally:
        engine.close()
    assert (handle["text"], handle["tokens"]) == (record["text"], record["tokens"])


def test_silero_vad_hears_the_sentences_and_not_the_silence(spoken):
    path, placed = spoken
    recording = Recording.of(path)
    probabilities = np.concatenate(list(SileroVad().probabilities(recording.blocks(7.0))))
    assert len(probabilities) == int(np.ceil(recording.seconds * 16000 / FRAME))
    times = (np.arange(len(probabilities)) + 0.5) * FRAME / 16000
    inside = np.zeros(len(times), bool)
    for begin, end in placed:
        inside |= (times >= begin) & (times <= end)
    assert probabilities[inside].mean() > 0.6 and probabilities[~inside].mean() < 0.1


def test_energy_and_fixed_splitting(serve_bundles, spoken, capsys):
    path, placed = spoken
    bundle = serve_bundles["lalm"]
    for split in ("energy", "fixed"):
        result = run_main(infer_main, bundle, "--audio", path, "--split", split, "--max-new-tokens", 2, "--json", "-q", capsys=capsys)
        assert result.returncode == 0, result.stderr
        segments = json.loads(result.stdout.splitlines()[0])["segments"]
        if split == "energy":
            check_segments(segments, placed, 48.0)
        else:  # windows end to end, overlapping, silence and all
            assert segments[0]["start"] == 0 and all(b["start"] < a["end"] for a, b in zip(segments, segments[1:]))


def test_speech_regions_follow_silero_defaults():
    frames_per_s = 16000 / FRAME
    probabilities = np.zeros(int(20 * frames_per_s), np.float32)
    probabilities[int(1 * frames_per_s) : int(3 * frames_per_s)] = 0.9  # 2 s of speech
    probabilities[int(3.05 * frames_per_s) : int(4 * frames_per_s)] = 0.9  # after a 50 ms pause: the same stretch
    probabilities[int(8 * frames_per_s) : int(8.1 * frames_per_s)] = 0.9  # a 0.1 s burst: dropped
    probabilities[int(10 * frames_per_s) : int(12 * frames_per_s)] = 0.6  # speech; 0.4 inside does not end it (hysteresis)
    probabilities[int(11 * frames_per_s)] = 0.4
    regions = [(a / 16000, b / 16000) for a, b in speech_regions(probabilities, 20 * 16000)]
    assert len(regions) == 2 and np.allclose(regions, [(0.97, 4.03), (9.97, 12.03)], atol=FRAME / 16000)  # 30 ms pads, within a frame
    tight = [(a / 16000, b / 16000) for a, b in speech_regions(probabilities, 20 * 16000, pad_seconds=(0.0, 0.03))]
    assert np.allclose(tight, [(1.0, 4.03), (10.0, 12.03)], atol=FRAME / 16000)


def test_pieces_join_stretches_that_fit_and_cut_long_speech_with_an_overlap():
    second = 16000
    regions = [(0, 3 * second), (4 * second, 9 * second), (20 * second, 24 * second), (24 * second + 8000, 60 * second)]
    pieces = plan_pieces(regions, window_seconds=10.0)
    # the first two share a piece; a long stretch starts its own (cut at the pause before it), then windows
    assert [p.seconds for p in pieces] == [(0.0, 9.0), (20.0, 24.0), (24.5, 34.5), (33.5, 43.5), (42.5, 52.5), (51.5, 60.0)]
    assert [p.overlaps_previous for p in pieces] == [False, False, False, True, True, True]
    assert pieces[3].start == pieces[2].end - OVERLAP_SECONDS * second


def test_words_in_an_overlap_are_not_doubled():
    pieces = [Piece(0, 10), Piece(9, 20, overlaps_previous=True), Piece(30, 40)]
    assert joined_text(["one two three", "Three, four five", "five six"], pieces) == "one two three four five five six"
    assert joined_text(["a b", "c d", ""], pieces) == "a b c d"


def test_subtitles_in_srt_and_vtt():
    segments = [Segment(0, 0.0, 2.5, "hello there", [1]), Segment(1, 3.25, 3661.0, "general kenobi", [2]), Segment(2, 4.0, 5.0, "", [])]
    assert subtitles(segments, "srt") == "1\n00:00:00,000 --> 00:00:02,500\nhello there\n\n2\n00:00:03,250 --> 01:01:01,000\ngeneral kenobi\n"
    assert subtitles(segments, "vtt").startswith("WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nhello there\n")


def test_a_long_recording_streams_its_pieces_texts_in_order(serve_bundles, spoken):
    path, _ = spoken
    with running_server({"lalm": serve_bundles["lalm"]}, ServeSettings(max_new_tokens=TOKENS)) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with open(path, "rb") as handle:
            events = list(client.audio.transcriptions.create(model="lalm", file=handle, stream=True, extra_body={"split": "fixed"}))
        with open(path, "rb") as handle:
            whole = client.audio.transcriptions.create(model="lalm", file=handle, response_format="verbose_json", extra_body={"split": "fixed"})
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    done = [e for e in events if e.type == "transcript.text.done"]
    assert len(deltas) > 4 and len(done) == 1  # a delta per piece that adds words (random weights repeat theirs: the overlap drops some)
    assert "".join(deltas) == done[0].text == whole.text  # fixed windows overlap: the overlap's words kept once in both


def test_split_is_refused_for_an_encoder_bundle_and_an_unknown_splitter(serve_bundles, spoken, capsys):
    path, _ = spoken
    assert_user_error(run_main(infer_main, serve_bundles["wav2vec2"], "--audio", path, "--split", "vad", capsys=capsys), "--split cuts long recordings")
    assert_user_error(
        run_main(batch_main, serve_bundles["wav2vec2"], "--input", path, "--output", path.with_suffix(".jsonl"), "--split", "vad", capsys=capsys),
        "--split cuts long recordings",
    )
    with running_server({"lalm": serve_bundles["lalm"]}, ServeSettings(max_new_tokens=TOKENS)) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with open(path, "rb") as handle, pytest.raises(openai.BadRequestError, match="split must be one of"):
            client.audio.transcriptions.create(model="lalm", file=handle, extra_body={"split": "words"})


def test_energy_vad_marks_loud_frames_over_the_noise_floor():
    rng = np.random.default_rng(0)
    quiet = rng.normal(0, 1e-3, 16000 * 4).astype(np.float32)
    quiet[16000:32000] += np.sin(np.arange(16000) * 2 * np.pi * 697 / 16000).astype(np.float32) * 0.3
    flags = np.concatenate(list(EnergyVad().probabilities([quiet])))
    second = 16000 // FRAME
    assert flags[second + 1 : 2 * second - 1].all() and not flags[: second - 1].any() and not flags[2 * second + 1 :].any()


def test_a_silent_recording_has_no_segments_and_a_broken_one_is_a_clear_error(serve_bundles, tmp_path, capsys):
    bundle = serve_bundles["lalm"]
    silent, broken = tmp_path / "silent.wav", tmp_path / "broken.wav"
    sf.write(silent, np.zeros(90 * 16_000, np.float32), 16_000, subtype="PCM_16")
    result = run_main(infer_main, bundle, "--audio", silent, "--json", "-q", capsys=capsys)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert (record["text"], record["segments"], record["tokens"]) == ("", [], [])  # silence skipped: nothing to transcribe
    samples = np.full(90 * 16_000, 0.1, np.float32)
    samples[70 * 16_000] = np.nan  # past the first block: found while it streams
    sf.write(broken, samples, 16_000, subtype="FLOAT")
    assert_user_error(run_main(infer_main, bundle, "--audio", broken, capsys=capsys), "broken.wav: the audio contains NaN or infinite samples")
