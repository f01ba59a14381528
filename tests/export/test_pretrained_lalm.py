"""Audio LLMs people already have (issue 25): a Hugging Face checkpoint of a supported
architecture, exported with `lalm-export --lalm`, gives the tokens the checkpoint's own
`generate(**processor(text=..., audio=...))` gives, through runtime.infer and runtime.serve."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import torch

from lalm_export.cli import main as export_main
from lalm_export.demo.tiny import build_tiny_tokenizer
from runtime.api import load
from runtime.audio import load_audio
from runtime.generation import GenerationOptions
from runtime.server.engine import ServeSettings
from tests.helpers import assert_user_error, randomize_lora, run_main
from tests.runtime.serving import running_server

TOKENS = 16


def save_tiny_qwen2_audio(folder: Path, seed: int) -> Path:
    """A tiny random Qwen2-Audio checkpoint and its processor (tokenizer built offline, the
    audio tokens added as the published checkpoints have them)."""
    from transformers import (
        AutoTokenizer,
        Qwen2AudioConfig,
        Qwen2AudioEncoderConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        Qwen2Config,
        WhisperFeatureExtractor,
    )

    build_tiny_tokenizer(folder / "tokenizer-source")
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer-source")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]})
    audio = Qwen2AudioEncoderConfig(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=128)
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=False,
    )  # fmt: skip
    config = Qwen2AudioConfig(audio_config=audio, text_config=text, audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"))
    torch.manual_seed(seed)
    Qwen2AudioForConditionalGeneration(config).save_pretrained(folder / "checkpoint")
    Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer).save_pretrained(folder / "checkpoint")
    return folder / "checkpoint"


@pytest.fixture(scope="module")
def qwen2_audio(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, bundle exported from it)."""
    root = tmp_path_factory.mktemp("qwen2-audio")
    checkpoint = save_tiny_qwen2_audio(root, seed=0)
    assert export_main(["--lalm", str(checkpoint), "--output", str(root / "bundle"), "-q"]) == 0
    return checkpoint, root / "bundle"


def eager_tokens(checkpoint: Path, prompt: str, samples) -> list[int]:
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    processor = AutoProcessor.from_pretrained(checkpoint)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(checkpoint).eval()
    inputs = processor(text=prompt, audio=samples, sampling_rate=16_000, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_qwen2_audio_bundle_gives_the_checkpoints_own_generate_tokens(qwen2_audio, audio_files):
    checkpoint, bundle = qwen2_audio
    manifest = json.loads((bundle / "manifest.json").read_text())
    extra = manifest["extra"]
    assert manifest["parity"]["passed"] and extra["encoder"]["family"] == "qwen2_audio"
    processor_config = json.loads((checkpoint / "processor_config.json").read_text())
    assert extra["audio_token"] == processor_config["audio_token"]  # from the checkpoint, not written here
    assert extra["audio_token_id"] == json.loads((checkpoint / "config.json").read_text())["audio_token_index"]
    assert extra["prompt"].count(extra["audio_token"]) == 1 and "<|im_start|>assistant" in extra["prompt"]  # its chat template
    runner = load(bundle)
    for path in (audio_files[0], audio_files[2]):  # 1.0 s and 1.5 s
        samples = load_audio(path).samples
        ours = runner.transcribe([path], options=GenerationOptions(max_new_tokens=TOKENS, stop_at_eos=False))[0].tokens
        assert ours == eager_tokens(checkpoint, extra["prompt"], samples), path.name


def save_whole_model_lora(checkpoint: Path, folder: Path) -> tuple[Path, Path]:
    """A peft LoRA on the whole checkpoint (attention of the audio tower and of the language
    model), with non-zero weights; (adapter, the merged checkpoint peft makes of it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    model = get_peft_model(Qwen2AudioForConditionalGeneration.from_pretrained(checkpoint), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model, seed=3, std=0.2)
    model.save_pretrained(folder / "adapter")
    model.merge_and_unload().save_pretrained(folder / "merged")
    AutoProcessor.from_pretrained(checkpoint).save_pretrained(folder / "merged")
    return folder / "adapter", folder / "merged"


def test_a_whole_model_lora_is_merged_as_peft_merges_it(qwen2_audio, audio_files, tmp_path, capsys):
    checkpoint, _ = qwen2_audio
    adapter, merged = save_whole_model_lora(checkpoint, tmp_path)
    result = run_main(export_main, "--lalm", checkpoint, "--adapter", adapter, "--output", tmp_path / "bundle", capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "merged LoRA into 8 Linear layers" in result.stderr  # q and v of 2 tower layers and 2 language-model layers
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["extra"]["components"]["checkpoint"]["merge"] == "lora"
    samples = load_audio(audio_files[2]).samples
    ours = load(tmp_path / "bundle").transcribe([audio_files[2]], options=GenerationOptions(max_new_tokens=TOKENS, stop_at_eos=False))[0].tokens
    assert ours == eager_tokens(merged, manifest["extra"]["prompt"], samples)
    assert ours != eager_tokens(checkpoint, manifest["extra"]["prompt"], samples)  # the adapter changes the answer


def test_an_adapter_for_another_model_is_one_line(qwen2_audio, checkpoints, tmp_path, capsys):
    from lalm_export.models import LLMDecoder

    decoder = LLMDecoder(str(checkpoints["llm"]), use_lora=True, lora_dropout=0.0)
    decoder.save_lora_weights(tmp_path / "llm-adapter")
    result = run_main(export_main, "--lalm", qwen2_audio[0], "--adapter", tmp_path / "llm-adapter", "--output", tmp_path / "bundle", capsys=capsys)
    assert result.returncode == 1
    assert_user_error(result, "which the model has no Linear layer for: it was trained for another model")
    assert not (tmp_path / "bundle").exists()


def test_the_gate_refuses_a_qwen2_audio_bundle_whose_audio_tower_was_swapped(qwen2_audio, tmp_path, capsys, monkeypatch):
    """The graph exported is another checkpoint's tower: the gate, comparing with this one's, refuses it."""
    from transformers import Qwen2AudioForConditionalGeneration

    import lalm_export.export.lalm as export_lalm

    other = Qwen2AudioForConditionalGeneration.from_pretrained(save_tiny_qwen2_audio(tmp_path / "other", seed=1)).eval()
    export_audio_encoder = export_lalm.export_audio_encoder

    def swapped(graph, feature_config, target):
        graph = type(graph)(other.model.audio_tower, other.model.multi_modal_projector, graph.spec, graph.hop_length).eval()
        export_audio_encoder(graph, feature_config, target)

    monkeypatch.setattr(export_lalm, "export_audio_encoder", swapped)
    result = run_main(export_main, "--lalm", qwen2_audio[0], "--output", tmp_path / "bundle", capsys=capsys)
    assert result.returncode == 1
    assert_user_error(result, "audio_features")
    assert not (tmp_path / "bundle").exists()


def test_runtime_serve_answers_a_qwen2_audio_bundle_as_runtime_does(qwen2_audio, audio_files):
    _, bundle = qwen2_audio
    expected = load(bundle).transcribe([audio_files[0]], options=GenerationOptions(max_new_tokens=TOKENS))[0].text
    with running_server({"qwen2-audio": bundle}, ServeSettings(max_new_tokens=TOKENS)) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with open(audio_files[0], "rb") as handle:
            assert client.audio.transcriptions.create(model="qwen2-audio", file=handle).text == expected


def test_a_chat_request_is_formatted_with_the_checkpoints_chat_template(qwen2_audio, audio_files):
    """The server renders a chat as the checkpoint's processor renders it (system turn and all),
    the input_audio part as the template's audio part."""
    import base64

    from transformers import AutoProcessor

    checkpoint, bundle = qwen2_audio
    assert (bundle / "chat_template.jinja").is_file()
    instruction = [{"type": "text", "text": "Transcribe the audio."}]
    eager_turns = [{"role": "system", "content": "You write down speech."}, {"role": "user", "content": [{"type": "audio", "audio_url": "a"}, *instruction]}]
    prompt = AutoProcessor.from_pretrained(checkpoint).apply_chat_template(eager_turns, add_generation_prompt=True, tokenize=False)
    expected = load(bundle).transcribe([audio_files[1]], prompt, GenerationOptions(max_new_tokens=TOKENS, stop_at_eos=False))[0].text
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(audio_files[1].read_bytes()).decode(), "format": "wav"}}
    messages = [{"role": "system", "content": "You write down speech."}, {"role": "user", "content": [audio, *instruction]}]
    with running_server({"qwen2-audio": bundle}, ServeSettings()) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="qwen2-audio", messages=messages, max_tokens=TOKENS, extra_body={"ignore_eos": True})
    assert reply.choices[0].message.content == expected


def test_an_instruction_goes_into_the_chat_template_through_every_door(qwen2_audio, audio_files, tmp_path, capsys):
    """`runtime.infer --prompt`, `runtime.batch --prompt` and a transcription's `prompt` put the
    text in a user turn after the audio, as the checkpoint's processor renders it."""
    from transformers import AutoProcessor

    from runtime.batch import main as batch_main
    from runtime.infer import main as infer_main

    checkpoint, bundle = qwen2_audio
    text = "Say what you hear."
    turn = [{"role": "user", "content": [{"type": "audio", "audio_url": "a"}, {"type": "text", "text": text}]}]
    prompt = AutoProcessor.from_pretrained(checkpoint).apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    expected = eager_tokens(checkpoint, prompt, load_audio(audio_files[0]).samples)
    common = ["--prompt", text, "--max-new-tokens", TOKENS, "--ignore-eos"]
    infer = run_main(infer_main, bundle, "--audio", audio_files[0], *common, "--json", "-q", capsys=capsys)
    assert json.loads(infer.stdout)["tokens"] == expected, infer.stderr
    batch = run_main(
        batch_main, bundle, "--input", audio_files[0], "--output", tmp_path / "o.jsonl", "--prompt", text, "--max-new-tokens", TOKENS, "-q", capsys=capsys
    )
    assert batch.returncode == 0, batch.stderr
    text_out = load(bundle).transcribe([audio_files[0]], prompt, GenerationOptions(max_new_tokens=TOKENS))[0].text
    assert json.loads((tmp_path / "o.jsonl").read_text())["text"] == text_out
    with running_server({"qwen2-audio": bundle}, ServeSettings(max_new_tokens=TOKENS)) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with open(audio_files[0], "rb") as handle:
            assert client.audio.transcriptions.create(model="qwen2-audio", file=handle, prompt=text).text == text_out


def test_a_chat_template_the_manifest_points_outside_the_bundle_is_refused(qwen2_audio, tmp_path):
    import shutil

    from runtime.errors import BundleError

    bundle = shutil.copytree(qwen2_audio[1], tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["extra"]["chat_template"] = "../outside.jinja"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="extra.chat_template names '../outside.jinja', which is not a file of the bundle"):
        load(bundle)


def without_layer_one(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".layers.1." not in k}, folder / "model.safetensors", metadata={"format": "pt"})


def without_processor(folder: Path) -> None:
    for name in ("processor_config.json", "preprocessor_config.json"):
        (folder / name).unlink(missing_ok=True)


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (without_layer_one, "lacks 27 weight(s) the qwen2_audio model needs (e.g. model.audio_tower.layers.1."),
        (without_processor, "holds no processor (processor_config.json or preprocessor_config.json)"),
    ],
    ids=["weights missing", "no processor"],
)
def test_an_incomplete_checkpoint_is_one_line_not_random_weights(damage, fragment, qwen2_audio, tmp_path, capsys):
    import shutil

    checkpoint = shutil.copytree(qwen2_audio[0], tmp_path / "checkpoint")
    damage(checkpoint)
    result = run_main(export_main, "--lalm", checkpoint, "--output", tmp_path / "bundle", capsys=capsys)
    assert result.returncode == 1
    assert_user_error(result, fragment)
    assert not (tmp_path / "bundle").exists()


def test_a_checkpoint_of_an_architecture_without_a_row_is_one_line(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text('{"model_type": "bert"}')
    result = run_main(export_main, "--lalm", tmp_path / "ckpt", "--output", tmp_path / "bundle", capsys=capsys)
    assert result.returncode == 1
    assert_user_error(result, "is a 'bert' checkpoint; --lalm takes an LALM saved by LALM.save_pretrained() or a checkpoint of qwen2_audio")
