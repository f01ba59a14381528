"""Audio LLMs people already have (issue 25): a Hugging Face checkpoint of each supported
architecture, exported with `lalm-export --lalm`, gives the tokens the checkpoint's own
`generate` on its processor's inputs gives, through runtime.infer and runtime.serve; then what
is particular to Qwen2-Audio's chat template. Voxtral's and Granite Speech's own cases are in
test_voxtral.py and test_granite_speech.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import openai
import pytest

from lalm_export.cli import main as export_main
from runtime.api import load
from runtime.audio import load_audio
from runtime.generation import GenerationOptions
from runtime.server.engine import ServeSettings
from tests.export.tiny_checkpoints import ARCHITECTURES
from tests.helpers import assert_user_error, randomize_lora, run_main
from tests.runtime.serving import running_server

TOKENS = 16
ALL = pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))


def runtime_tokens(bundle: Path, clip: Path) -> list[int]:
    return load(bundle).transcribe([clip], options=GenerationOptions(max_new_tokens=TOKENS, stop_at_eos=False))[0].tokens


@ALL
def test_the_bundle_gives_the_checkpoints_own_generate_tokens(model_type, tiny_lalm, audio_files):
    from transformers import AutoConfig

    checkpoint, bundle = tiny_lalm(model_type)
    manifest = json.loads((bundle / "manifest.json").read_text())
    extra = manifest["extra"]
    assert manifest["parity"]["passed"] and extra["encoder"]["family"] == model_type
    assert extra["audio_token_id"] == AutoConfig.from_pretrained(checkpoint).audio_token_id  # from the checkpoint, never written here
    for path in (audio_files[0], audio_files[2]):  # 1.0 s and 1.5 s
        expected = ARCHITECTURES[model_type].eager_tokens(checkpoint, extra["prompt"], load_audio(path).samples, TOKENS)
        assert runtime_tokens(bundle, path) == expected, path.name


@ALL
def test_a_whole_model_lora_is_merged_as_peft_merges_it(model_type, tiny_lalm, audio_files, tmp_path, capsys):
    """A peft LoRA on the whole checkpoint (audio tower and language model), with non-zero weights:
    the bundle's tokens are those of peft's `merge_and_unload()` of it."""
    import transformers
    from peft import LoraConfig, get_peft_model

    architecture = ARCHITECTURES[model_type]
    checkpoint, bundle = tiny_lalm(model_type)
    base = getattr(transformers, architecture.model_class).from_pretrained(checkpoint)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=list(architecture.lora_targets)))
    randomize_lora(model, seed=3, std=0.2)
    model.save_pretrained(tmp_path / "adapter")
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    transformers.AutoProcessor.from_pretrained(checkpoint).save_pretrained(tmp_path / "merged")
    result = run_main(export_main, "--lalm", checkpoint, "--adapter", tmp_path / "adapter", "--output", tmp_path / "bundle", capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert f"merged LoRA into {architecture.lora_layers} Linear layers" in result.stderr
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["extra"]["components"]["checkpoint"]["merge"] == "lora"
    samples, prompt = load_audio(audio_files[2]).samples, manifest["extra"]["prompt"]
    tokens = runtime_tokens(tmp_path / "bundle", audio_files[2])
    assert tokens == architecture.eager_tokens(tmp_path / "merged", prompt, samples, TOKENS)
    assert tokens != architecture.eager_tokens(checkpoint, prompt, samples, TOKENS)  # the adapter changes the answer


@ALL
def test_the_gate_refuses_a_bundle_whose_audio_tower_was_swapped(model_type, tiny_lalm, tmp_path, capsys, monkeypatch):
    """The graph exported is another checkpoint's tower and projector, taken apart by the same
    registry row: the gate, comparing with this checkpoint's, refuses it."""
    import transformers

    import lalm_export.export.lalm as export_lalm
    from lalm_export.models.pretrained import PRETRAINED

    architecture, row = ARCHITECTURES[model_type], PRETRAINED[model_type]
    other = getattr(transformers, architecture.model_class).from_pretrained(architecture.save(tmp_path / "other", 1)).eval()
    export_audio_encoder = export_lalm.export_audio_encoder

    def swapped(graph, feature_config, target):
        export_audio_encoder(row.split(other, graph.spec, feature_config)[0], feature_config, target)

    monkeypatch.setattr(export_lalm, "export_audio_encoder", swapped)
    result = run_main(export_main, "--lalm", tiny_lalm(model_type)[0], "--output", tmp_path / "bundle", capsys=capsys)
    assert result.returncode == 1
    assert_user_error(result, "audio_features")
    assert not (tmp_path / "bundle").exists()


@ALL
def test_runtime_serve_transcribes_as_runtime_does(model_type, tiny_lalm, audio_files):
    _, bundle = tiny_lalm(model_type)
    expected = load(bundle).transcribe([audio_files[0]], options=GenerationOptions(max_new_tokens=TOKENS))[0].text
    with running_server({model_type: bundle}, ServeSettings(max_new_tokens=TOKENS)) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with open(audio_files[0], "rb") as handle:
            assert client.audio.transcriptions.create(model=model_type, file=handle).text == expected


def bundle_logits(bundle: Path, clip: Path, prompt: str):
    """The bundle's next-token logits after the prompt with the clip's audio."""
    import numpy as np

    runner = load(bundle)
    embeds = runner.prompt_embeds(runner.audio_features(load_audio(clip).samples), prompt, GenerationOptions())
    return runner.new_backend().prefill_embeds(embeds, np.ones(embeds.shape[:2], dtype=np.int64))[0]


def test_a_qlora_adapter_is_merged_into_the_dequantized_4bit_checkpoint(audio_files, tmp_path, capsys):
    """`--qlora`: the adapter was trained on the checkpoint loaded in 4 bits (bitsandbytes nf4);
    the bundle's logits are those of that 4-bit model with the adapter (within the rounding of
    bitsandbytes' CPU 4-bit kernel, 0.3 % of the largest logit here), over ten times closer than a
    merge into the full-precision weights it was not trained on."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoProcessor, BitsAndBytesConfig, Qwen2AudioForConditionalGeneration

    from tests.export.tiny_checkpoints import save_tiny_qwen2_audio

    checkpoint = save_tiny_qwen2_audio(tmp_path, seed=0, audio_width=64)
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    base = Qwen2AudioForConditionalGeneration.from_pretrained(checkpoint, quantization_config=nf4, dtype=torch.float32)
    trained = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(trained, seed=3, std=0.2)
    trained.save_pretrained(tmp_path / "adapter")
    common = ("--lalm", checkpoint, "--adapter", tmp_path / "adapter")
    result = run_main(export_main, *common, "--qlora", "--output", tmp_path / "qlora", capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "(4-bit nf4 base, as the adapter was trained)" in result.stderr and "dequantized 27 4-bit Linear layers to fp32" in result.stderr
    manifest = json.loads((tmp_path / "qlora" / "manifest.json").read_text())
    assert manifest["extra"]["components"]["checkpoint"]["merge"] == "qlora-dequantized"
    assert run_main(export_main, *common, "--output", tmp_path / "naive", "-q", capsys=capsys).returncode == 0
    prompt = manifest["extra"]["prompt"]
    inputs = AutoProcessor.from_pretrained(checkpoint)(text=prompt, audio=load_audio(audio_files[2]).samples, sampling_rate=16_000, return_tensors="pt")
    with torch.no_grad():
        expected = trained(**inputs).logits[0, -1].numpy()
    qlora_error = np.abs(bundle_logits(tmp_path / "qlora", audio_files[2], prompt) - expected).max()
    naive_error = np.abs(bundle_logits(tmp_path / "naive", audio_files[2], prompt) - expected).max()
    assert qlora_error < 1e-2 * np.abs(expected).max() and naive_error > 10 * qlora_error, (qlora_error, naive_error)


def test_qlora_needs_an_adapter(tiny_lalm, tmp_path, capsys):
    result = run_main(export_main, "--lalm", tiny_lalm("qwen2_audio")[0], "--qlora", "--output", tmp_path / "bundle", capsys=capsys)
    assert result.returncode == 1
    assert_user_error(result, "--qlora describes the 4-bit base an adapter was trained on: pass --adapter too")


@pytest.mark.parametrize(
    "model_type, module, fragment",
    [
        ("voxtral", "mistral_common", "whose processor needs mistral_common: pip install 'lalm-export[mistral]'"),
        ("granite_speech", "torchaudio", "whose processor needs torchaudio: pip install torchaudio"),
    ],
)
def test_a_checkpoint_whose_processor_needs_a_missing_package_is_one_line(model_type, module, fragment, tiny_lalm, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    result = run_main(export_main, "--lalm", tiny_lalm(model_type)[0], "--output", tmp_path / "bundle", capsys=capsys)
    assert result.returncode == 1
    assert_user_error(result, fragment)
    assert not (tmp_path / "bundle").exists()


# --- Qwen2-Audio: its processor's placeholder and its chat template -------------------------------


@pytest.fixture(scope="module")
def qwen2_audio(tiny_lalm) -> tuple[Path, Path]:
    """(checkpoint, bundle exported from it)."""
    return tiny_lalm("qwen2_audio")


def eager_tokens(checkpoint: Path, prompt: str, samples) -> list[int]:
    return ARCHITECTURES["qwen2_audio"].eager_tokens(checkpoint, prompt, samples, TOKENS)


def test_qwen2_audio_takes_its_placeholder_and_prompt_from_the_checkpoint(qwen2_audio):
    checkpoint, bundle = qwen2_audio
    extra = json.loads((bundle / "manifest.json").read_text())["extra"]
    processor_config = json.loads((checkpoint / "processor_config.json").read_text())
    assert extra["audio_token"] == processor_config["audio_token"]  # from the checkpoint, not written here
    assert extra["audio_token_id"] == json.loads((checkpoint / "config.json").read_text())["audio_token_index"]
    assert extra["prompt"].count(extra["audio_token"]) == 1 and "<|im_start|>assistant" in extra["prompt"]  # its chat template
    assert extra["chat_content"] == "parts"  # the template reads audio parts


def test_an_adapter_for_another_model_is_one_line(qwen2_audio, checkpoints, tmp_path, capsys):
    from lalm_export.models import LLMDecoder

    decoder = LLMDecoder(str(checkpoints["llm"]), use_lora=True, lora_dropout=0.0)
    decoder.save_lora_weights(tmp_path / "llm-adapter")
    result = run_main(export_main, "--lalm", qwen2_audio[0], "--adapter", tmp_path / "llm-adapter", "--output", tmp_path / "bundle", capsys=capsys)
    assert result.returncode == 1
    assert_user_error(result, "which the model has no Linear layer for: it was trained for another model")
    assert not (tmp_path / "bundle").exists()


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
    assert_user_error(
        result, "is a 'bert' checkpoint; --lalm takes an LALM saved by LALM.save_pretrained() or a checkpoint of granite_speech, qwen2_audio, voxtral"
    )


def test_qwen2_audio_runs_only_the_window_up_to_the_longest_clip_with_the_whole_windows_features(qwen2_audio):
    """The exported tower crops the 30 s window after the batch's longest clip (the rest is
    masked): each clip's features equal the checkpoint's tower over the whole window, for clips
    batched with longer and shorter ones and for one that fills the window."""
    import numpy as np
    import torch
    from transformers import Qwen2AudioForConditionalGeneration

    from lalm_export.models.tower_graphs import Qwen2AudioTowerGraph
    from lalm_export.parity.signals import speech_like
    from runtime.audio import features_for

    checkpoint, bundle = qwen2_audio
    model = Qwen2AudioForConditionalGeneration.from_pretrained(checkpoint).eval()
    eager = Qwen2AudioTowerGraph(model.model.audio_tower, model.model.multi_modal_projector, None, 160).eval()
    runner = load(bundle)
    clips = [speech_like(seconds, seed=index) for index, seconds in enumerate((3.0, 12.4, 30.0))]
    ours = runner.audio_features_batch(clips)
    for clip, features in zip(clips, ours):
        window = torch.from_numpy(features_for("log_mel", clip, runner.feature_config)[None])
        with torch.no_grad():
            projected, positions = eager(window, torch.tensor([len(clip)]))
        expected = projected[0, : int(positions[0])].numpy()
        assert features.shape == expected.shape and np.abs(features - expected).max() < 1e-4 * np.abs(expected).max()


def test_a_text_config_that_says_tied_where_the_checkpoint_is_not_keeps_both_matrices(audio_files, tmp_path, capsys):
    """Qwen2-Audio's text config may say tie_word_embeddings while the whole model keeps its
    output head apart from its embedding: the bundle keeps both, as the checkpoint runs."""
    from lalm_export.demo.tiny import save_random_qwen2_audio

    audio = {"d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "num_mel_bins": 128}
    text = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    }
    checkpoint = save_random_qwen2_audio(tmp_path, audio, text, seed=0)
    assert run_main(export_main, "--lalm", checkpoint, "--output", tmp_path / "bundle", "-q", capsys=capsys).returncode == 0
    prompt = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["extra"]["prompt"]
    expected = ARCHITECTURES["qwen2_audio"].eager_tokens(checkpoint, prompt, load_audio(audio_files[0]).samples, TOKENS)
    assert runtime_tokens(tmp_path / "bundle", audio_files[0]) == expected


def test_an_audio_tower_past_protobufs_limit_is_exported_with_its_weights_beside_it(audio_files, tmp_path, capsys, monkeypatch):
    """At a size CI can afford: torch.onnx writes a graph past 2 GB as a file per tensor, made
    so here for a tiny tower, with the limit lowered to its size. The bundle carries the weights
    in `audio_encoder.onnx_data` (in the manifest, checked on load) and gives the same tokens.
    The real size (Qwen2-Audio-7B's 2.5 GB tower) is measured by `python -m benchmarks pretrained-lalm`."""
    import onnx
    import torch

    import lalm_export.graphs.files as files
    from tests.export.tiny_checkpoints import save_tiny_qwen2_audio

    export = torch.onnx.export

    def as_past_the_limit(module, args, path, **kwargs):  # what the tracer writes for a graph past 2 GB
        export(module, args, path, **kwargs)
        onnx.save_model(onnx.load(path), path, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)

    checkpoint = save_tiny_qwen2_audio(tmp_path, seed=0)
    monkeypatch.setattr(torch.onnx, "export", as_past_the_limit)
    monkeypatch.setattr(files, "LARGE_GRAPH_BYTES", 100_000)  # the tiny tower's 0.3 MB is past it; the decoder's own path is untouched
    assert run_main(export_main, "--lalm", checkpoint, "--output", tmp_path / "bundle", "-q", capsys=capsys).returncode == 0
    monkeypatch.undo()
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert "audio_encoder.onnx_data" in manifest["graphs"]["audio_encoder"]["data_files"]
    assert (tmp_path / "bundle" / "audio_encoder.onnx_data").stat().st_size > 100_000
    prompt = manifest["extra"]["prompt"]
    expected = ARCHITECTURES["qwen2_audio"].eager_tokens(checkpoint, prompt, load_audio(audio_files[0]).samples, TOKENS)
    assert runtime_tokens(tmp_path / "bundle", audio_files[0]) == expected
