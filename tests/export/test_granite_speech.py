"""Granite Speech checkpoints (issue 25), beyond what every architecture shows
(test_pretrained_lalm): its stacked log-mel front end in numpy, its conformer's block attention
exported for any length, a placeholder the model generates embedded as the checkpoint embeds it,
and its chat template that reads content as one string."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import openai
import pytest
import soundfile as sf

from lalm_export.cli import main as export_main
from lalm_export.parity.signals import speech_like
from runtime.api import load
from runtime.audio import stacked_log_mel
from runtime.errors import AudioError
from runtime.generation import GenerationOptions
from runtime.server.engine import ServeSettings
from tests.export.tiny_checkpoints import ARCHITECTURES
from tests.helpers import assert_user_error, edit_json, run_main
from tests.runtime.serving import running_server

TOKENS = 24


@pytest.fixture(scope="module")
def granite(tiny_lalm) -> tuple[Path, Path]:
    """(checkpoint, bundle exported from it)."""
    return tiny_lalm("granite_speech")


@pytest.mark.parametrize("seconds", [0.05, 1.0, 2.37, 7.01])
def test_the_numpy_front_end_gives_the_checkpoints_features(granite, seconds):
    """torchaudio's MelSpectrogram in the checkpoint's feature extractor, our numpy in the runtime."""
    from transformers import AutoProcessor

    extractor = AutoProcessor.from_pretrained(granite[0]).audio_processor
    clip = speech_like(seconds, seed=2).astype(np.float32)
    expected = extractor(clip)["input_features"][0].numpy()
    ours = stacked_log_mel(clip, json.loads((granite[1] / "preprocessor_config.json").read_text()))
    assert ours.shape == expected.shape and np.abs(ours - expected).max() < 1e-4


def test_clips_of_any_length_give_the_checkpoints_tokens(granite, tmp_path):
    """Lengths whose encoder frames fill the last attention block, leave it part-filled, and fill
    several projector windows: the block padding follows the clip, not the traced one. At 7.3 s the
    model generates its own placeholder, which it embeds as token 0."""
    checkpoint, bundle = granite
    runner, extra = load(bundle), json.loads((bundle / "manifest.json").read_text())["extra"]
    for seconds in (0.4, 1.2, 7.3):  # 20 encoder frames (one whole block of 20), 60, 365
        path = tmp_path / f"{seconds}.wav"
        sf.write(path, speech_like(seconds, seed=1), 16_000, subtype="FLOAT")
        ours = runner.transcribe([path], options=GenerationOptions(max_new_tokens=TOKENS, stop_at_eos=False))[0].tokens
        expected = ARCHITECTURES["granite_speech"].eager_tokens(checkpoint, extra["prompt"], sf.read(path, dtype="float32")[0], TOKENS)
        assert ours == expected, seconds
    table = np.load(bundle / "embed_tokens.npy")
    assert np.array_equal(table[extra["audio_token_id"]], table[0])


def test_the_bundle_records_what_the_runtime_bounds_a_clip_by(granite):
    extra = json.loads((granite[1] / "manifest.json").read_text())["extra"]
    assert extra["encoder"] == {
        "family": "granite_speech", "sampling_rate": 16_000, "hidden_size": 32, "num_attention_heads": 2,
        "receptive_field_samples": 257, "frame_samples": 320,
    }  # fmt: skip
    runner = load(granite[1])
    with pytest.raises(AudioError, match="shorter than the encoder's receptive field of 257 samples"):
        runner.transcribe([np.zeros(200, dtype=np.float32)])


def test_a_chat_request_is_one_string_with_the_placeholder_in_it(granite, audio_files):
    """Granite's template reads each message's content as a string: the server joins the parts,
    the audio as `<|audio|>`, as the checkpoint's users write it."""
    from transformers import AutoProcessor

    checkpoint, bundle = granite
    extra = json.loads((bundle / "manifest.json").read_text())["extra"]
    assert extra["chat_content"] == "text"
    turns = [{"role": "system", "content": "You write down speech."}, {"role": "user", "content": "<|audio|>Say what you hear."}]
    prompt = AutoProcessor.from_pretrained(checkpoint).tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    expected = load(bundle).transcribe([audio_files[1]], prompt, GenerationOptions(max_new_tokens=TOKENS, stop_at_eos=False))[0].text
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(audio_files[1].read_bytes()).decode(), "format": "wav"}}
    messages = [{"role": "system", "content": "You write down speech."}, {"role": "user", "content": [audio, {"type": "text", "text": "Say what you hear."}]}]
    with running_server({"granite": bundle}, ServeSettings()) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="granite", messages=messages, max_tokens=TOKENS, extra_body={"ignore_eos": True})
    assert reply.choices[0].message.content == expected


DAMAGED = {
    "a hop length of 0": ("preprocessor_config.json", lambda c: c["melspec_kwargs"].update(hop_length=0), "melspec_kwargs.hop_length 0 is not a whole number"),
    "melspec_kwargs not an object": ("preprocessor_config.json", lambda c: c.update(melspec_kwargs=[]), "melspec_kwargs must be an object"),
    "a content form nobody reads": ("manifest.json", lambda m: m["extra"].update(chat_content="xml"), "extra.chat_content is 'xml'"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_a_damaged_granite_bundle_is_one_line(case, granite, audio_files, tmp_path, capsys):
    import shutil

    from runtime.infer import main as infer_main

    name, change, fragment = DAMAGED[case]
    bundle = shutil.copytree(granite[1], tmp_path / "bundle")
    edit_json(bundle / name, change)
    result = run_main(infer_main, bundle, "--audio", audio_files[0], capsys=capsys)
    assert result.returncode == 1
    assert_user_error(result, fragment)


def test_the_adapter_a_checkpoint_carries_is_merged(granite, audio_files, tmp_path, capsys):
    """The published checkpoints carry a LoRA adapter that their model enables whenever audio is
    given (every bundle request): the bundle merges it, and the tokens are the checkpoint's own
    `generate`, which loads and enables it."""
    from tests.export.tiny_checkpoints import with_own_adapter

    checkpoint = with_own_adapter(granite[0], tmp_path / "checkpoint", ("q_proj", "v_proj"), seed=5)
    result = run_main(export_main, "--lalm", checkpoint, "--output", tmp_path / "bundle", capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "merged LoRA into 4 Linear layers (the checkpoint's own)" in result.stderr
    extra = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["extra"]
    assert extra["components"]["checkpoint"]["merge"] == "checkpoint-lora"
    samples = sf.read(audio_files[2], dtype="float32")[0]
    ours = load(tmp_path / "bundle").transcribe([audio_files[2]], options=GenerationOptions(max_new_tokens=TOKENS, stop_at_eos=False))[0].tokens
    eager = ARCHITECTURES["granite_speech"]
    assert ours == eager.eager_tokens(checkpoint, extra["prompt"], samples, TOKENS)
    assert ours != eager.eager_tokens(granite[0], extra["prompt"], samples, TOKENS)  # the adapter changes the answer
