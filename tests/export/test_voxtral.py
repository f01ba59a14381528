"""Voxtral checkpoints (issue 25): a tiny random one, its Tekken tokenizer read by
mistral-common, exported with `lalm-export --lalm`, gives the tokens the checkpoint's own
`generate(**processor.apply_transcription_request(...))` gives, through runtime.infer and
runtime.serve; its chats are rendered as mistral-common renders them."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import numpy as np
import openai
import pytest
import torch

from lalm_export.cli import main as export_main
from runtime.api import load
from runtime.audio import load_audio
from runtime.generation import GenerationOptions
from runtime.server.engine import ServeSettings
from tests.export.tiny_checkpoints import save_tiny_voxtral
from tests.helpers import assert_user_error, randomize_lora, run_main
from tests.runtime.serving import running_server

TOKENS = 16


@pytest.fixture(scope="module")
def voxtral(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, bundle exported from it)."""
    root = tmp_path_factory.mktemp("voxtral")
    checkpoint = save_tiny_voxtral(root, seed=0)
    assert export_main(["--lalm", str(checkpoint), "--output", str(root / "bundle"), "-q"]) == 0
    return checkpoint, root / "bundle"


def eager_tokens(checkpoint: Path, samples: np.ndarray) -> list[int]:
    """The checkpoint's own transcription: mistral-common's request, then `generate`."""
    from transformers import AutoProcessor, VoxtralForConditionalGeneration

    processor = AutoProcessor.from_pretrained(checkpoint)
    model = VoxtralForConditionalGeneration.from_pretrained(checkpoint).eval()
    inputs = processor.apply_transcription_request(audio=[samples], sampling_rate=16_000, format=["wav"], model_id="tiny", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def ours(bundle: Path, path: Path) -> list[int]:
    return load(bundle).transcribe([path], options=GenerationOptions(max_new_tokens=TOKENS, stop_at_eos=False))[0].tokens


def test_voxtral_bundle_gives_the_checkpoints_own_generate_tokens(voxtral, audio_files):
    checkpoint, bundle = voxtral
    manifest = json.loads((bundle / "manifest.json").read_text())
    extra = manifest["extra"]
    assert manifest["parity"]["passed"] and extra["encoder"]["family"] == "voxtral"
    assert extra["audio_token_id"] == json.loads((checkpoint / "config.json").read_text())["audio_token_id"]
    # mistral-common's transcription request, its run of [AUDIO] kept once; the special ids from the Tekken file
    assert extra["prompt"] == "<s>[INST][BEGIN_AUDIO][AUDIO][/INST][TRANSCRIBE]"
    assert (extra["bos_token_id"], extra["eos_token_id"]) == (1, 2)
    assert (bundle / "tokenizer.json").is_file() and not (bundle / "tekken.json").exists()  # the runtime reads no Tekken file
    for path in (audio_files[0], audio_files[2]):  # 1.0 s and 1.5 s
        assert ours(bundle, path) == eager_tokens(checkpoint, load_audio(path).samples), path.name


def test_every_clip_of_up_to_30_s_takes_375_audio_positions(voxtral, audio_files):
    """As the checkpoint's processor pads every clip to the 30 s window: 375 projected positions."""
    _, bundle = voxtral
    runner = load(bundle)
    prompt_ids = runner.prompt_ids(runner.facts["prompt"])
    result = runner.transcribe([audio_files[2]], options=GenerationOptions(max_new_tokens=2))[0]
    assert result.prompt_tokens == len(prompt_ids) - 1 + 375


def test_a_whole_model_lora_on_voxtral_is_merged_as_peft_merges_it(voxtral, audio_files, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoProcessor, VoxtralForConditionalGeneration

    checkpoint, _ = voxtral
    model = get_peft_model(VoxtralForConditionalGeneration.from_pretrained(checkpoint), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model, seed=3, std=0.2)
    model.save_pretrained(tmp_path / "adapter")
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    AutoProcessor.from_pretrained(checkpoint).save_pretrained(tmp_path / "merged")
    result = run_main(export_main, "--lalm", checkpoint, "--adapter", tmp_path / "adapter", "--output", tmp_path / "bundle", capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "merged LoRA into 8 Linear layers" in result.stderr  # q and v of 2 tower layers and 2 language-model layers
    samples = load_audio(audio_files[2]).samples
    tokens = ours(tmp_path / "bundle", audio_files[2])
    assert tokens == eager_tokens(tmp_path / "merged", samples)
    assert tokens != eager_tokens(checkpoint, samples)  # the adapter changes the answer


def test_the_gate_refuses_a_voxtral_bundle_whose_audio_tower_was_swapped(voxtral, tmp_path, capsys, monkeypatch):
    from transformers import VoxtralForConditionalGeneration

    import lalm_export.export.lalm as export_lalm

    other = VoxtralForConditionalGeneration.from_pretrained(save_tiny_voxtral(tmp_path / "other", seed=1)).eval()
    export_audio_encoder = export_lalm.export_audio_encoder

    def swapped(graph, feature_config, target):
        export_audio_encoder(type(graph)(other.model.audio_tower, other.model.multi_modal_projector, graph.spec).eval(), feature_config, target)

    monkeypatch.setattr(export_lalm, "export_audio_encoder", swapped)
    result = run_main(export_main, "--lalm", voxtral[0], "--output", tmp_path / "bundle", capsys=capsys)
    assert result.returncode == 1
    assert_user_error(result, "audio_features")
    assert not (tmp_path / "bundle").exists()


def test_a_voxtral_checkpoint_without_mistral_common_is_one_line(voxtral, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mistral_common", None)  # as if not installed
    result = run_main(export_main, "--lalm", voxtral[0], "--output", tmp_path / "bundle", capsys=capsys)
    assert result.returncode == 1
    assert_user_error(result, "whose processor needs mistral_common: pip install 'lalm-export[mistral]'")
    assert not (tmp_path / "bundle").exists()


def mistral_chat_ids(checkpoint: Path, clip: Path, text: str) -> list[int]:
    """mistral-common's ids for one user turn (the clip, then `text`), its run of [AUDIO] kept once."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    turn = [{"role": "user", "content": [{"type": "audio", "path": str(clip)}, {"type": "text", "text": text}]}]
    ids = processor.apply_chat_template(turn, tokenize=True, return_dict=True)["input_ids"][0].tolist()
    return [t for i, t in enumerate(ids) if not (t == processor.audio_token_id and i and ids[i - 1] == t)]


def test_a_chat_through_runtime_serve_is_rendered_as_mistral_common_renders_it(voxtral, audio_files):
    checkpoint, bundle = voxtral
    runner = load(bundle)
    text = "Say what you hear."
    prompt = runner.instruction_prompt(text)
    assert runner.prompt_ids(prompt) == mistral_chat_ids(checkpoint, audio_files[1], text)
    expected = runner.transcribe([audio_files[1]], prompt, GenerationOptions(max_new_tokens=TOKENS, stop_at_eos=False))[0].text
    transcribed = runner.transcribe([audio_files[0]], options=GenerationOptions(max_new_tokens=TOKENS))[0].text
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(audio_files[1].read_bytes()).decode(), "format": "wav"}}
    with running_server({"voxtral": bundle}, ServeSettings(max_new_tokens=TOKENS)) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": [audio, {"type": "text", "text": text}]}]
        reply = client.chat.completions.create(model="voxtral", messages=messages, max_tokens=TOKENS, extra_body={"ignore_eos": True})
        with open(audio_files[0], "rb") as handle:
            assert client.audio.transcriptions.create(model="voxtral", file=handle).text == transcribed
    assert reply.choices[0].message.content == expected
