"""The audio LLM: the model (projector, placeholder, loss, generation, checkpoints), its
bundle (every encoder family with a Llama- and a Qwen2-style decoder, adapters merged) and the
torch-free runtime, whose tokens must equal the eager model's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import soundfile as sf
import torch

from lalm_export.cli import main as export_main
from lalm_export.demo.tiny import save_random_checkpoint
from lalm_export.demo.training import train_lalm
from lalm_export.errors import OptionsError
from lalm_export.export.lalm import export_lalm_bundle
from lalm_export.export.options import LalmExportOptions
from lalm_export.export.pipeline import STAGES
from lalm_export.models import LLMDecoder, encoder_class
from lalm_export.models.lalm import LALM, ProjectorConfig
from lalm_export.parity.signals import speech_like
from runtime.api import load
from runtime.audio import load_audio
from runtime.errors import RuntimeUserError
from runtime.generation import GenerationOptions
from runtime.infer import main as infer_main
from runtime.runners.lalm import clip_audio
from tests.graphs.test_fused import tiny_decoder_config
from tests.helpers import assert_user_error, edit_json, randomize_lora, run_main

CLIPS = (speech_like(1.0), speech_like(1.7, seed=3))


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return save_random_checkpoint("llm", tmp_path_factory.mktemp("qwen2") / "qwen2", tiny_decoder_config("qwen2", tied=True), seed=4)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """A decoder outside the fused graph's architectures (its embeddings scaled inside the model)."""
    return save_random_checkpoint("llm", tmp_path_factory.mktemp("gemma") / "gemma", tiny_decoder_config("gemma", tied=True), seed=5)


def tiny_lalm(checkpoints, family: str, decoder_path=None, decoder_mode: dict | None = None, **projector) -> LALM:
    encoder = encoder_class(family)(str(checkpoints[family]), use_lora=True, lora_dropout=0.0)
    decoder = LLMDecoder(str(decoder_path or checkpoints["llm"]), **(decoder_mode or {"use_lora": True, "lora_dropout": 0.0}))
    randomize_lora(encoder, seed=1)
    randomize_lora(decoder, seed=2)
    return LALM(encoder, decoder, ProjectorConfig(**{"downsample": 2, **projector}))


def test_placeholder_expands_to_the_clip_frames_and_padding_is_cut(checkpoints):
    model = tiny_lalm(checkpoints, "whisper", downsample=4)
    features = model.audio_features([speech_like(2.0), speech_like(0.5)])
    # Whisper: ceil(samples / 320) encoder frames of the 1500 in its window, then ceil(/ 4)
    assert [f.shape[0] for f in features] == [25, 7]
    ids = model.prompt_ids(None)
    embeds = model.embed_prompt(ids, features[0])
    assert embeds.shape == (len(ids) - 1 + 25, model.decoder.get_hidden_size())
    with pytest.raises(OptionsError, match="exactly once"):
        model.embed_prompt(ids + [model.audio_token_id], features[0])


def test_loss_counts_the_target_text_only(checkpoints):
    model = tiny_lalm(checkpoints, "wav2vec2")
    model.set_training_mode()
    out = model([CLIPS[0]], **model.training_batch([None], ["one two"]))
    target = model.decoder.tokenizer("one two", add_special_tokens=False)["input_ids"] + [model.decoder.tokenizer.eos_token_id]
    prompt_positions = len(model.prompt_ids(None)) - 1 + model.audio_features([CLIPS[0]])[0].shape[0]
    assert out.logits.shape[1] == prompt_positions + len(target)
    # the positions before each target token predict it; audio and prompt positions carry no loss
    predicting = out.logits[0, prompt_positions - 1 : prompt_positions - 1 + len(target)]
    expected = torch.nn.functional.cross_entropy(predicting.float(), torch.tensor(target))
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    trained = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == {"encoder", "decoder", "projector"}  # LoRA on both, the projector always


def test_forward_takes_a_padded_audio_tensor_and_token_rows_padded_on_either_side(checkpoints):
    """The Hugging Face style batch: a padded waveform tensor with lengths, input_ids with an
    attention mask (left padding here), labels of -100 where no loss goes."""
    model = tiny_lalm(checkpoints, "wav2vec2")
    model.set_inference_mode()
    batch = model.training_batch([None, "<|audio|>Say it again:"], ["one two", "three"])
    reference = model(list(CLIPS), **batch)
    lengths = [len(clip) for clip in CLIPS]
    padded = torch.zeros(2, max(lengths))
    for row, clip in enumerate(CLIPS):
        padded[row, : len(clip)] = torch.from_numpy(clip)
    shift = (batch["attention_mask"] == 0).sum(dim=1)  # right padding moved to the left
    left = {name: torch.stack([torch.roll(row, int(n)) for row, n in zip(value, shift)]) for name, value in batch.items()}
    out = model(padded, **left, audio_lengths=torch.tensor(lengths))
    torch.testing.assert_close(out.loss, reference.loss)
    assert model(padded, batch["input_ids"], batch["attention_mask"], audio_lengths=lengths).loss is None  # no labels, no loss
    with pytest.raises(OptionsError, match="audio_lengths must give each"):
        model(padded, **batch, audio_lengths=[lengths[0]])
    with pytest.raises(OptionsError, match="exactly once"):
        model(list(CLIPS), torch.ones(2, 4, dtype=torch.long))
    assert model.generate(padded, audio_lengths=lengths, max_new_tokens=6) == model.generate(list(CLIPS), max_new_tokens=6)


def test_audio_that_is_not_a_batch_of_mono_clips_is_refused_with_what_to_do(checkpoints):
    model = tiny_lalm(checkpoints, "wav2vec2")
    with pytest.raises(OptionsError, match="not a 1-D one; wrap a single clip in a list"):
        model.generate(CLIPS[0], max_new_tokens=2)
    with pytest.raises(OptionsError, match=r"each clip is 1-D .* not of shape \(2, 16000\); mix channels down"):
        model.generate([np.zeros((2, 16_000), dtype=np.float32)], max_new_tokens=2)
    with pytest.raises(OptionsError, match="not a 3-D one"):
        model(torch.zeros(1, 1, 16_000), torch.ones(1, 4, dtype=torch.long))


def test_modes_decide_what_trains(checkpoints):
    frozen = LALM(encoder_class("hubert")(str(checkpoints["hubert"])), LLMDecoder(str(checkpoints["llm"])), ProjectorConfig(layer_weights=True))
    frozen.set_training_mode()
    trainable = {name.split(".")[0] for name, p in frozen.named_parameters() if p.requires_grad}
    assert trainable == {"projector"} and frozen.projector.layer_weights.requires_grad


@pytest.mark.parametrize("steps", [10, 25])  # 10: a one-step warm-up, which OneCycleLR cannot take
def test_train_lalm_lowers_the_loss_of_a_batch_for_any_step_count(checkpoints, steps):
    model = tiny_lalm(checkpoints, "wav2vec2")
    targets = ["one two", "three"]

    def loss() -> float:
        with torch.no_grad():
            return model(list(CLIPS), **model.training_batch([None, None], targets)).loss.item()

    model.set_inference_mode()  # no dropout in either measurement
    before, seen = loss(), []
    train_lalm(model, lambda step: (CLIPS, targets), steps, on_step=lambda step, value: seen.append(step))
    assert seen == list(range(steps)) and loss() < before


def test_train_lalm_in_bf16_autocast_runs_the_decoder_in_bf16_and_keeps_fp32_weights(checkpoints):
    model = tiny_lalm(checkpoints, "wav2vec2")
    targets = ["one two", "three"]

    def loss() -> float:
        with torch.no_grad():
            return model(list(CLIPS), **model.training_batch([None, None], targets)).loss.item()

    model.set_inference_mode()
    before, logits = loss(), []
    hook = model.decoder.model.register_forward_hook(lambda module, args, output: logits.append(output.logits.dtype))
    try:
        train_lalm(model, lambda step: (CLIPS, targets), 10, bf16=True)
    finally:
        hook.remove()
    assert logits == [torch.bfloat16] * 10
    assert all(p.dtype == torch.float32 for p in model.parameters()) and loss() < before


def test_save_and_load_give_the_same_model_and_training_goes_on(checkpoints, tmp_path):
    model = tiny_lalm(checkpoints, "hubert", layer_weights=True)
    model.set_inference_mode()
    expected = model.generate(list(CLIPS), max_new_tokens=12)
    model.save_pretrained(tmp_path / "lalm")
    assert sorted(p.name for p in (tmp_path / "lalm").iterdir()) == ["decoder", "encoder", "lalm_config.json", "projector.safetensors", "tokenizer"]
    assert not list((tmp_path / "lalm").rglob("*.bin")) and not list((tmp_path / "lalm").rglob("*.pt"))  # safetensors only
    reloaded = LALM.from_pretrained(tmp_path / "lalm")
    reloaded.set_inference_mode()
    assert reloaded.generate(list(CLIPS), max_new_tokens=12) == expected
    reloaded.set_training_mode()  # continuous learning: the reloaded adapters and projector train on
    reloaded(list(CLIPS), **reloaded.training_batch([None, None], ["a", "b"])).loss.backward()
    assert any(p.grad is not None for p in reloaded.projector.parameters())


@pytest.mark.parametrize("decoder", ["llama", "qwen2"])
def test_bundle_tokens_equal_eager_for_every_encoder_family(decoder, encoder_family, checkpoints, qwen2, audio_files, tmp_path):
    """Audio files (16 kHz mono, and 8 kHz stereo the runtime resamples), the two of one length generated as one batch."""
    model = tiny_lalm(checkpoints, encoder_family, decoder_path=qwen2 if decoder == "qwen2" else None)
    model.save_pretrained(tmp_path / "lalm")
    manifest = export_lalm_bundle(LalmExportOptions(lalm=tmp_path / "lalm", output=tmp_path / "bundle"), quiet=True)
    assert manifest.role == "lalm" and manifest.parity["passed"] and manifest.parity["greedy"]["agreement"] == 1.0
    assert manifest.extra["audio_token_id"] == model.audio_token_id and manifest.extra["embedding"]["kind"] == "host table"
    model.set_inference_mode()
    clips = [load_audio(path).samples for path in audio_files]
    expected = [tokens for _, tokens in model.generate(clips, max_new_tokens=32, stop_at_eos=False)]
    ours = load(tmp_path / "bundle").transcribe(audio_files, options=GenerationOptions(max_new_tokens=32, stop_at_eos=False))
    assert [t.tokens for t in ours] == expected and max(t.batch_size for t in ours) == 2


@pytest.mark.parametrize(
    "decoder, flags",
    [("gemma", []), ("llama", ["--decoder-graph", "optimum", "--decoder-precision", "int8"]), ("qwen2", ["--decoder-graph", "optimum", "--precision", "fp16"])],
)
def test_optimums_graph_on_embeddings_where_the_fused_graph_does_not_apply(decoder, flags, checkpoints, gemma, qwen2, tmp_path, capsys):
    model = tiny_lalm(checkpoints, "whisper", decoder_path={"gemma": gemma, "qwen2": qwen2}.get(decoder))
    model.save_pretrained(tmp_path / "lalm")
    result = run_main(export_main, "--lalm", tmp_path / "lalm", "--output", tmp_path / "bundle", "--json", *flags, capsys=capsys)
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["extra"]["decoder_graph"] == "optimum (inputs_embeds)" and manifest["parity"]["passed"]
    fused_encoder = [] if "fp16" in flags else ["self-attention fused into MultiHeadAttention"]  # Whisper's attention, fp32 or int8 on the CPU
    assert manifest["optimizations"] == [*fused_encoder, "logits for the last position only"]
    graph = onnx.load(str(tmp_path / "bundle" / "decoder.onnx"), load_external_data=False)
    inputs = {i.name for i in graph.graph.input}
    assert "inputs_embeds" in inputs and "input_ids" not in inputs and "GroupQueryAttention" not in {n.op_type for n in graph.graph.node}
    options = GenerationOptions(max_new_tokens=32, stop_at_eos=False)
    ours = [t.tokens for t in load(tmp_path / "bundle").transcribe(list(CLIPS), options=options)]
    if not flags:  # fp32: every token equals eager's
        model.set_inference_mode()
        assert manifest["parity"]["greedy"]["agreement"] == 1.0
        assert ours == [tokens for _, tokens in model.generate(list(CLIPS), max_new_tokens=32, stop_at_eos=False)]
    assert all(len(tokens) == 32 for tokens in ours)


def test_a_token_table_that_is_not_what_the_embedding_module_computes_fails_the_gate(checkpoints, gemma, tmp_path, capsys, monkeypatch):
    """Gemma's embedding module scales its rows (transformers 5): a table of its raw weights,
    as bundles were written before, gives other prompts than the eager LALM, and the gate,
    whose eager side embeds with the module, refuses it."""
    import lalm_export.export.lalm as export_lalm

    monkeypatch.setattr(export_lalm, "token_table", lambda decoder: decoder.get_input_embeddings().weight.detach().float().numpy())
    tiny_lalm(checkpoints, "whisper", decoder_path=gemma).save_pretrained(tmp_path / "lalm")
    result = run_main(export_main, "--lalm", tmp_path / "lalm", "--output", tmp_path / "bundle", capsys=capsys)
    assert_user_error(result, "greedy tokens")
    assert not (tmp_path / "bundle").exists()


def nan_in_decoder_lora(model: LALM) -> None:
    weight = next(p for n, p in model.decoder.model.named_parameters() if "lora_B" in n)
    weight.data[0, 0] = float("nan")


def nan_in_projector(model: LALM) -> None:
    next(model.projector.parameters()).data.view(-1)[0] = float("nan")


@pytest.mark.parametrize("poison", [nan_in_decoder_lora, nan_in_projector], ids=["decoder LoRA", "projector"])
def test_nan_weights_in_any_part_fail_the_lalm_gate(poison, checkpoints, tmp_path, capsys):
    """argmax of all-NaN logits is token 0 on both sides: greedy tokens alone would agree. The
    gate checks the decoder's logits and the projector's output for NaN and inf too."""
    model = tiny_lalm(checkpoints, "wav2vec2")
    poison(model)
    model.save_pretrained(tmp_path / "lalm")
    result = run_main(export_main, "--lalm", tmp_path / "lalm", "--output", tmp_path / "bundle", capsys=capsys)
    assert_user_error(result, "NaN or inf")
    assert not (tmp_path / "bundle").exists()


def test_a_fused_graph_for_a_decoder_it_does_not_cover_is_refused(checkpoints, gemma, tmp_path, capsys):
    tiny_lalm(checkpoints, "hubert", decoder_path=gemma).save_pretrained(tmp_path / "lalm")
    result = run_main(export_main, "--lalm", tmp_path / "lalm", "--output", tmp_path / "b", "--decoder-graph", "fused", capsys=capsys)
    assert_user_error(result, "--decoder-graph fused: GemmaForCausalLM is not one of the fused-graph architectures")
    assert not (tmp_path / "b").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_an_lalm_for_cuda_without_a_gpu_is_a_clear_error(checkpoints, tmp_path, capsys):
    tiny_lalm(checkpoints, "hubert").save_pretrained(tmp_path / "lalm")
    result = run_main(export_main, "--lalm", tmp_path / "lalm", "--output", tmp_path / "b", "--precision", "fp16", "--device", "cuda", capsys=capsys)
    assert_user_error(result, "--device cuda: PyTorch sees no CUDA GPU here")
    assert not (tmp_path / "b").exists()


def test_a_whisper_encoder_takes_an_adapter_trained_on_the_whole_whisper_model(checkpoints, tmp_path, capsys):
    """The usual recipe (peft on WhisperForConditionalGeneration, q_proj/v_proj) adapts the text
    decoder too: the wrapper loads the encoder's part and says what it left out, and an LALM
    folder holding such an adapter exports its encoder part, counted in the manifest."""
    from peft import LoraConfig, get_peft_model
    from transformers import WhisperForConditionalGeneration

    from lalm_export.models import WhisperAudioEncoder
    from tests.helpers import relative_error

    whole = get_peft_model(
        WhisperForConditionalGeneration.from_pretrained(str(checkpoints["whisper"])), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    randomize_lora(whole, seed=3)
    whole.save_pretrained(str(tmp_path / "whole"))
    left_out = sum(1 for name, _ in whole.named_modules() if ".decoder." in name and name.endswith(("q_proj", "v_proj")))
    encoder = WhisperAudioEncoder(
        str(checkpoints["whisper"]), use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=("q_proj", "v_proj")
    )
    with pytest.warns(UserWarning, match=f"also adapts {left_out} modules outside the whisper encoder"):
        encoder.load_lora_weights(tmp_path / "whole")
    features = torch.randn(1, 80, 3000)
    with torch.no_grad():
        expected = whole.merge_and_unload().model.encoder(features).last_hidden_state
        assert relative_error(expected, encoder.encoder(features).last_hidden_state) <= 1e-5
    model = LALM(encoder, LLMDecoder(str(checkpoints["llm"])), ProjectorConfig(downsample=2))
    model.save_pretrained(tmp_path / "lalm")
    shutil.rmtree(tmp_path / "lalm" / "encoder")
    shutil.copytree(tmp_path / "whole", tmp_path / "lalm" / "encoder")  # the whole model's adapter as the LALM's encoder
    result = run_main(export_main, "--lalm", tmp_path / "lalm", "--output", tmp_path / "bundle", "--json", capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert f"encoder: note: the adapter also adapts {left_out} modules outside the whisper encoder" in result.stderr
    # one progress line per stage, both parts loaded and merged under it
    assert [result.stderr.count(f"[{i}/6] {stage}") for i, stage in enumerate(STAGES, 1)] == [1] * 6
    assert "encoder: merged LoRA into" in result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["extra"]["components"]["encoder"]["adapter_modules_left_out"] == left_out and manifest["parity"]["greedy"]["agreement"] == 1.0
    model.set_inference_mode()
    options = GenerationOptions(max_new_tokens=32, stop_at_eos=False)
    expected_tokens = [tokens for _, tokens in model.generate(list(CLIPS), max_new_tokens=32, stop_at_eos=False)]
    assert [t.tokens for t in load(tmp_path / "bundle").transcribe(list(CLIPS), options=options)] == expected_tokens


def test_qlora_decoder_is_merged_into_its_dequantized_base(checkpoints, tmp_path):
    model = tiny_lalm(checkpoints, "wav2vec2", decoder_mode={"use_qlora": True, "lora_dropout": 0.0})
    model.save_pretrained(tmp_path / "lalm")
    manifest = export_lalm_bundle(LalmExportOptions(lalm=tmp_path / "lalm", output=tmp_path / "bundle"), quiet=True)
    assert manifest.extra["components"]["decoder"]["merge"] == "qlora-dequantized" and manifest.parity["passed"]


def test_a_fine_tuned_decoder_exports_with_its_audio_token_rows(checkpoints, tmp_path):
    model = tiny_lalm(checkpoints, "wav2vec2", decoder_mode={"finetune": True})
    with torch.no_grad():  # trained rows, the audio token's included: a reload from the base alone would lose them
        model.decoder.get_input_embeddings().weight.add_(0.01 * torch.randn_like(model.decoder.get_input_embeddings().weight))
    model.save_pretrained(tmp_path / "lalm")
    manifest = export_lalm_bundle(LalmExportOptions(lalm=tmp_path / "lalm", output=tmp_path / "bundle"), quiet=True)
    assert manifest.extra["components"]["decoder"]["merge"] == "full-weights" and manifest.parity["greedy"]["agreement"] == 1.0
    table = np.load(tmp_path / "bundle" / "embed_tokens.npy")
    assert np.array_equal(table, model.decoder.get_input_embeddings().weight.detach().numpy())


def test_infer_transcribes_audio_files_as_json_and_streams(checkpoints, tmp_path, capsys):
    model = tiny_lalm(checkpoints, "whisper")
    model.save_pretrained(tmp_path / "lalm")
    result = run_main(export_main, "--lalm", tmp_path / "lalm", "--output", tmp_path / "bundle", "-q", capsys=capsys)
    assert result.returncode == 0, result.stderr
    files = []
    for index, clip in enumerate(CLIPS):
        files.append(tmp_path / f"clip{index}.wav")
        sf.write(files[-1], clip, 16_000, subtype="FLOAT")
    result = run_main(infer_main, tmp_path / "bundle", "--audio", *files, "--max-new-tokens", "16", "--json", capsys=capsys)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["file"] for r in records] == [str(f) for f in files]
    for record in records:
        assert {"text", "tokens", "time_to_first_token_s", "tokens_per_s", "audio_s", "encoder_s", "prefill_s", "decode_s"} <= set(record)
    model.set_inference_mode()
    expected = model.generate([sf.read(f, dtype="float32")[0] for f in files], max_new_tokens=16)
    assert [r["tokens"] for r in records] == [tokens for _, tokens in expected]
    streamed = run_main(infer_main, tmp_path / "bundle", "--audio", files[0], "--max-new-tokens", "16", "--prompt", "Transcribe the audio:", capsys=capsys)
    assert streamed.returncode == 0 and streamed.stdout == records[0]["text"] + "\n"
    plain = run_main(infer_main, tmp_path / "bundle", "--audio", *files, "--max-new-tokens", "16", capsys=capsys)
    assert plain.stdout == "".join(f"{Path(f).name}: {r['text']}\n" for f, r in zip(files, records))  # one format for every file
    # a prompt in another encoding than UTF-8 arrives as lone surrogates: one line, as for decoders
    not_utf8 = run_main(infer_main, tmp_path / "bundle", "--audio", files[0], "--prompt", "caf\udce9 <|audio|>", capsys=capsys)
    assert_user_error(not_utf8, "not valid UTF-8")


def test_clips_with_as_many_frames_generate_as_one_batch_with_the_tokens_of_each_alone(checkpoints, tmp_path):
    tiny_lalm(checkpoints, "wav2vec2").save_pretrained(tmp_path / "lalm")
    export_lalm_bundle(LalmExportOptions(lalm=tmp_path / "lalm", output=tmp_path / "bundle"), quiet=True)
    runner = load(tmp_path / "bundle")
    clips = [speech_like(1.0, seed=0), speech_like(1.0, seed=7), speech_like(1.3, seed=9), speech_like(1.0, seed=11)]
    options = GenerationOptions(max_new_tokens=24)
    together = runner.transcribe(clips, options=options)
    assert [t.batch_size for t in together] == [3, 3, 1, 3]
    alone = [runner.transcribe([clip], options=options)[0] for clip in clips]
    assert [t.tokens for t in together] == [t.tokens for t in alone] and [t.text for t in together] == [t.text for t in alone]
    # A stop string ends a row where it would end alone; the others go on. The rows: two clips of
    # as many frames whose texts differ (random weights: a 3-character piece of one not in the other).
    stop, (i, j) = next(
        (text[k : k + 3], (a, b))
        for a, b in ((0, 1), (1, 0), (0, 3), (3, 0), (1, 3), (3, 1))
        for text in [alone[a].text]
        for k in range(len(text) - 2)
        if "\ufffd" not in text[k : k + 3] and text[k : k + 3] not in alone[b].text
    )
    audios, prompt = [clip_audio(clips[n], n) for n in (i, j)], runner.facts["prompt"]
    features = runner.audio_features_batch([a.samples for a in audios])
    options = runner.resolve(None, options)[1]
    batched = runner.transcribe_batch(audios, features, 0.0, prompt, options, stop_strings=[stop])
    single = [runner.transcribe_batch([a], [f], 0.0, prompt, options, stop_strings=[stop])[0] for a, f in zip(audios, features)]
    assert [t.tokens for t in batched] == [t.tokens for t in single]
    assert len(batched[0].tokens) < len(batched[1].tokens) == len(alone[j].tokens) and stop not in batched[0].text


def test_a_prompt_holds_the_audio_placeholder_once_or_gets_it_first_and_one_clip_needs_no_list(checkpoints, audio_files, tmp_path):
    tiny_lalm(checkpoints, "wav2vec2").save_pretrained(tmp_path / "lalm")
    export_lalm_bundle(LalmExportOptions(lalm=tmp_path / "lalm", output=tmp_path / "bundle"), quiet=True)
    runner = load(tmp_path / "bundle")
    for one in (CLIPS[0], audio_files[0], str(audio_files[0])):  # not iterated as samples or characters
        assert [t.tokens for t in runner.transcribe(one)] == [t.tokens for t in runner.transcribe([one])]
    with pytest.raises(RuntimeUserError, match=r"expected mono samples \(one dimension\), got shape \(2, 16000\)"):
        runner.transcribe([np.zeros((2, 16_000), dtype=np.float32)])
    # An instruction without the placeholder follows the audio, as through runtime.infer --prompt and the server.
    instructed = runner.transcribe([CLIPS[0]], prompt="Transcribe the audio:")[0]
    assert instructed.tokens == runner.transcribe([CLIPS[0]], prompt="<|audio|>Transcribe the audio:")[0].tokens
    with pytest.raises(RuntimeUserError, match="placeholder exactly once .*, not 2 times"):
        runner.transcribe([CLIPS[0]], prompt="<|audio|> and <|audio|>")


def test_an_lalm_folder_moves_with_the_base_models_it_holds(checkpoints, tmp_path, capsys):
    folder = tmp_path / "lalm"
    for part in ("wav2vec2", "llm"):
        shutil.copytree(checkpoints[part], folder / "bases" / part)
    moved_checkpoints = {part: folder / "bases" / part for part in ("wav2vec2", "llm")}
    model = tiny_lalm(moved_checkpoints, "wav2vec2")
    model.save_pretrained(folder)
    config = json.loads((folder / "lalm_config.json").read_text(encoding="utf-8"))
    assert (config["encoder"]["base_model"], config["decoder"]["base_model"]) == ("bases/wav2vec2", "bases/llm")
    shutil.move(folder, tmp_path / "moved")
    assert LALM.from_pretrained(tmp_path / "moved").decoder.model_name == str((tmp_path / "moved" / "bases" / "llm").resolve())
    result = run_main(export_main, "--lalm", tmp_path / "moved", "--output", tmp_path / "bundle", "--json", capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["extra"]["components"]["decoder"]["model"] == str((tmp_path / "moved" / "bases" / "llm").resolve())


def test_a_relative_base_model_is_the_lalm_folders_never_the_current_directorys(checkpoints, tmp_path, capsys, monkeypatch):
    tiny_lalm(checkpoints, "wav2vec2").save_pretrained(tmp_path / "lalm")
    config_path = tmp_path / "lalm" / "lalm_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["decoder"]["base_model"] = "elsewhere/llm"  # relative, and not under the LALM folder
    config_path.write_text(json.dumps(config), encoding="utf-8")
    shutil.copytree(checkpoints["llm"], tmp_path / "cwd" / "elsewhere" / "llm")
    monkeypatch.chdir(tmp_path / "cwd")  # where such a path would have been read from
    result = run_main(export_main, "--lalm", tmp_path / "lalm", "--output", tmp_path / "bundle", capsys=capsys)
    assert_user_error(result, "not under the LALM folder")
    assert not (tmp_path / "bundle").exists()


def break_projector_shape(folder, checkpoints):
    other = folder.parent / "other-lalm"
    tiny_lalm(checkpoints, "wav2vec2", downsample=4).save_pretrained(other)
    shutil.copy(other / "projector.safetensors", folder / "projector.safetensors")


def edit_lalm_config(folder, change) -> None:
    config = json.loads((folder / "lalm_config.json").read_text(encoding="utf-8"))
    change(config)
    (folder / "lalm_config.json").write_text(json.dumps(config), encoding="utf-8")


MALFORMED_LALM_FOLDERS = {
    "projector saved for other sizes": (break_projector_shape, "does not fit this LALM"),
    "no projector settings": (lambda f, c: edit_lalm_config(f, lambda config: config.pop("projector")), "'projector' must hold"),
    "no tokenizer folder": (lambda f, c: shutil.rmtree(f / "tokenizer"), "has no tokenizer"),
    "encoder of another family than the config says": (lambda f, c: edit_lalm_config(f, lambda config: config["encoder"].update(family="hubert")), "hubert"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_LALM_FOLDERS))
def test_a_malformed_lalm_folder_is_one_line(case, checkpoints, tmp_path, capsys):
    damage, fragment = MALFORMED_LALM_FOLDERS[case]
    tiny_lalm(checkpoints, "wav2vec2").save_pretrained(tmp_path / "lalm")
    damage(tmp_path / "lalm", checkpoints)
    result = run_main(export_main, "--lalm", tmp_path / "lalm", "--output", tmp_path / "bundle", capsys=capsys)
    assert result.returncode == 1
    assert_user_error(result, fragment)
    assert not (tmp_path / "bundle").exists()


@pytest.fixture(scope="module")
def whisper_lalm_bundle(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("lalm-bundle")
    tiny_lalm(checkpoints, "whisper").save_pretrained(root / "lalm")
    export_lalm_bundle(LalmExportOptions(lalm=root / "lalm", output=root / "bundle"), quiet=True)
    return root / "bundle"


DAMAGED_LALM_BUNDLES = {
    "no token table record": (lambda b: edit_json(b / "manifest.json", lambda m: m["extra"].pop("embedding")), "extra.embedding must name"),
    "a context of 10**12 positions": (lambda b: edit_json(b / "manifest.json", lambda m: m["extra"].update(context_length=10**12)), "extra.context_length"),
    "an audio token id that is text": (lambda b: edit_json(b / "manifest.json", lambda m: m["extra"].update(audio_token_id="x")), "extra.audio_token_id"),
    "a hop length of 0": (lambda b: edit_json(b / "preprocessor_config.json", lambda c: c.update(hop_length=0)), "hop_length 0"),
    "the token table deleted": (lambda b: (b / "embed_tokens.npy").unlink(), "is missing or does not match"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_LALM_BUNDLES))
def test_a_damaged_lalm_bundle_is_one_line(case, whisper_lalm_bundle, tmp_path, capsys):
    damage, fragment = DAMAGED_LALM_BUNDLES[case]
    bundle = tmp_path / "bundle"
    shutil.copytree(whisper_lalm_bundle, bundle)
    damage(bundle)
    sf.write(tmp_path / "a.wav", speech_like(1.0), 16_000)
    result = run_main(infer_main, bundle, "--audio", tmp_path / "a.wav", capsys=capsys)
    assert result.returncode == 1
    assert_user_error(result, fragment)


def test_lalm_flags_that_describe_a_component_are_refused(checkpoints, tmp_path, capsys):
    model = tiny_lalm(checkpoints, "hubert")
    model.save_pretrained(tmp_path / "lalm")
    result = run_main(export_main, "--lalm", tmp_path / "lalm", "--output", tmp_path / "b", "--all-hidden-states", capsys=capsys)
    assert_user_error(result, "--all-hidden-states describes a single")
    assert result.returncode == 2, "a flag that does not apply is a bad flag"
    # --adapter and --qlora go with --lalm for a Hugging Face checkpoint's whole-model LoRA; an LALM folder records its own
    for argv, flag in ((["--adapter", tmp_path], "--adapter"), (["--adapter", tmp_path, "--qlora"], "--qlora")):
        result = run_main(export_main, "--lalm", tmp_path / "lalm", "--output", tmp_path / "b", *argv, capsys=capsys)
        assert result.returncode == 1
        assert_user_error(result, f"is an LALM folder, which records each part's adapter (and 4-bit base) itself; {flag} with --lalm is for")
    assert_user_error(run_main(export_main, "--lalm", tmp_path / "nope", "--output", tmp_path / "b", capsys=capsys), "does not exist")
    assert not (tmp_path / "b").exists()


def test_split_is_recorded_as_the_bundles_way_to_cut_long_recordings(checkpoints, tmp_path, capsys):
    model = tiny_lalm(checkpoints, "hubert")
    model.save_pretrained(tmp_path / "lalm")
    result = run_main(export_main, "--lalm", tmp_path / "lalm", "--output", tmp_path / "bundle", "--split", "energy", "-q", capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "bundle" / "manifest.json").read_text())["extra"]["split"] == "energy"
    assert load(tmp_path / "bundle").split_for(None) == "energy"
    result = run_main(export_main, "--encoder", "hubert", "--model", checkpoints["hubert"], "--output", tmp_path / "enc", "--split", "vad", capsys=capsys)
    assert_user_error(result, "--split records how an --lalm bundle cuts long recordings")
    assert not (tmp_path / "enc").exists()


@pytest.mark.parametrize(
    "flags, encoder, decoder",
    [
        (["--precision", "int8"], "int8", "int8"),
        (["--decoder-precision", "int4"], "fp32", "int4"),
        (["--precision", "int4", "--encoder-precision", "int8"], "int8", "int4"),
    ],
)
def test_precision_per_component(flags, encoder, decoder, checkpoints, tmp_path, capsys):
    model = tiny_lalm(checkpoints, "wav2vec2")
    model.save_pretrained(tmp_path / "lalm")
    result = run_main(export_main, "--lalm", tmp_path / "lalm", "--output", tmp_path / "bundle", "--json", *flags, capsys=capsys)
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["extra"]["precision"] == {"audio_encoder": encoder, "decoder": decoder} and manifest["parity"]["passed"]
    ops = {name: {n.op_type for n in onnx.load(str(tmp_path / "bundle" / name)).graph.node} for name in ("audio_encoder.onnx", "decoder.onnx")}
    assert ("MatMulInteger" in ops["audio_encoder.onnx"]) == (encoder == "int8")
    assert ("MatMulNBits" in ops["decoder.onnx"]) == (decoder == "int4")
    assert ("int8" in manifest["extra"]) == ("int8" in (encoder, decoder))
    assert manifest["parity"]["greedy"]["steps"] == 64 and manifest["parity"]["tolerance"]["greedy_agreement"] is None  # recorded, not gated
    (transcription,) = load(tmp_path / "bundle").transcribe([CLIPS[0]])
    assert transcription.tokens


def test_an_lalm_decoder_takes_gptq_int4_weights(checkpoints, tmp_path, capsys):
    """--int4-method gptq (and the other --int4-* flags) apply to an audio LLM's decoder as to a
    decoder bundle's: calibrated on the text file, recorded in the manifest, gated against the
    fp32 decoder; asked of an fp32 decoder, refused."""
    tiny_lalm(checkpoints, "wav2vec2").save_pretrained(tmp_path / "lalm")
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog, and one two three four five six seven."] * 40), encoding="utf-8")
    flags = ("--int4-method", "gptq", "--calibration", text, "--int4-block-size", "64")
    result = run_main(export_main, "--lalm", tmp_path / "lalm", "--decoder-precision", "int4", *flags, "--output", tmp_path / "b", "--json", capsys=capsys)
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    int4 = manifest["extra"]["int4"]
    assert int4["method"] == "gptq" and int4["calibration"] == "text file" and int4["block_size"] == 64 and int4["layers"] == 2 * 7
    assert manifest["parity"]["passed"] and manifest["extra"]["precision"]["decoder"] == "int4"
    nodes = [n for n in onnx.load(str(tmp_path / "b" / "decoder.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert nodes and all({a.name: a.i for a in n.attribute}["block_size"] == 64 for n in nodes)
    refused = run_main(export_main, "--lalm", tmp_path / "lalm", *flags, "--output", tmp_path / "fp32", capsys=capsys)
    assert_user_error(refused, "--int4-method gptq chooses int4 weights")
    assert not (tmp_path / "fp32").exists()


def test_an_lalm_takes_the_gate_bound_and_the_int8_target_cpu(checkpoints, tmp_path, capsys):
    tiny_lalm(checkpoints, "wav2vec2").save_pretrained(tmp_path / "lalm")
    common = ("--lalm", tmp_path / "lalm", "--encoder-precision", "int8", "--target-cpu", "avx2")
    refused = run_main(export_main, *common, "--min-cosine", "1.0", "--output", tmp_path / "strict", capsys=capsys)
    assert_user_error(refused, "ONNX graph disagrees with")  # int8 features are never exactly equal to eager fp32's
    assert not (tmp_path / "strict").exists()
    result = run_main(export_main, *common, "--min-cosine", "0.99", "--output", tmp_path / "b", "--json", capsys=capsys)
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["parity"]["tolerance"]["cosine"] == 0.99 and manifest["parity"]["tolerance"]["row_cosine"] == 0.99
    assert manifest["extra"]["int8"]["target_cpu"] == "avx2" and manifest["extra"]["int8"]["weight_range"] == "7-bit"
    fp32_encoder = run_main(export_main, "--lalm", tmp_path / "lalm", "--min-cosine", "0.99", "--output", tmp_path / "c", capsys=capsys)
    assert_user_error(fp32_encoder, "--min-cosine with --lalm is a bound in (0, 1] on the audio features of a reduced-precision audio encoder")


def test_per_component_precision_is_for_lalm_bundles(checkpoints, tmp_path, capsys):
    result = run_main(
        export_main, "--encoder", "hubert", "--model", checkpoints["hubert"], "--encoder-precision", "int8", "--output", tmp_path / "b", capsys=capsys
    )
    assert_user_error(result, "--encoder-precision and --decoder-precision choose an --lalm bundle's parts")


def test_audio_past_a_short_whisper_window_is_transcribed_in_pieces_not_cut(tmp_path, capsys):
    """A Whisper-style encoder with a 2 s window: 3 s of audio would lose its last second in
    the log-mel front end; the runtime cuts it into pieces within the window instead."""
    from lalm_export.demo.dtmf import build_dtmf_lalm
    from runtime.infer import main as infer_main

    build_dtmf_lalm(tmp_path / "checkpoints").save_pretrained(tmp_path / "lalm")
    manifest = export_lalm_bundle(LalmExportOptions(lalm=tmp_path / "lalm", output=tmp_path / "bundle"), quiet=True)
    assert manifest.extra["chunk_seconds"] == 2
    sf.write(tmp_path / "long.wav", speech_like(3.0), 16_000)
    result = run_main(infer_main, tmp_path / "bundle", "--audio", tmp_path / "long.wav", "--split", "fixed", "--json", "-q", capsys=capsys)
    assert result.returncode == 0, result.stderr
    segments = json.loads(result.stdout)["segments"]
    assert [(s["start"], s["end"]) for s in segments] == [(0.0, 2.0), (1.5, 3.0)]  # windows of 2 s overlapping by a quarter


def test_calibration_audio_joins_the_gate_and_the_int8_encoders_calibration(checkpoints, tmp_path, capsys):
    """--calibration-audio: the recordings in a folder (other files ignored) are judged by the
    gate beside its own clips (features, logits, greedy tokens of each) and fitted on by the
    int8 search; the manifest records them."""
    tiny_lalm(checkpoints, "wav2vec2").save_pretrained(tmp_path / "lalm")
    recordings = tmp_path / "recordings"
    recordings.mkdir()
    sf.write(recordings / "a.wav", speech_like(1.2, seed=7), 16_000)
    sf.write(recordings / "b.flac", speech_like(0.8, seed=8), 16_000)
    (recordings / "notes.txt").write_text("not audio")
    flags = ("--encoder-precision", "int8", "--calibration-audio", recordings, "--json")
    result = run_main(export_main, "--lalm", tmp_path / "lalm", *flags, "--output", tmp_path / "b", capsys=capsys)
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["extra"]["calibration_audio"] == {"path": str(recordings.resolve()), "files": ["a.wav", "b.flac"], "seconds": [1.2, 0.8]}
    assert "recording a.wav, 1.2 s, 32 greedy tokens" in manifest["parity"]["cases"]
    assert manifest["parity"]["greedy"]["steps"] == 4 * 32 and manifest["parity"]["passed"]


@pytest.mark.parametrize("case", ["missing", "no audio", "corrupt", "nan", "too short", "component export"])
def test_bad_calibration_audio_is_one_line_and_writes_nothing(case, checkpoints, tmp_path, capsys):
    tiny_lalm(checkpoints, "wav2vec2").save_pretrained(tmp_path / "lalm")
    folder = tmp_path / "recordings"
    folder.mkdir()
    source = ("--lalm", tmp_path / "lalm")
    if case == "missing":
        folder, expected = tmp_path / "nowhere", "does not exist"
    elif case == "no audio":
        (folder / "notes.txt").write_text("not audio")
        expected = "holds no audio files"
    elif case == "corrupt":
        (folder / "a.wav").write_bytes(b"RIFF not really a wav file")
        expected = "a.wav"
    elif case == "nan":
        clip = speech_like(1.0)
        clip[100] = np.nan
        sf.write(folder / "a.wav", clip, 16_000, subtype="FLOAT")
        expected = "NaN"
    elif case == "too short":
        sf.write(folder / "a.wav", speech_like(0.01), 16_000)
        expected = "at least 0.1 s"
    else:
        sf.write(folder / "a.wav", speech_like(1.0), 16_000)
        source, expected = ("--encoder", "wav2vec2", "--model", checkpoints["wav2vec2"]), "--calibration-audio gives an --lalm bundle's gate"
    result = run_main(export_main, *source, "--calibration-audio", folder, "--output", tmp_path / "b", capsys=capsys)
    assert_user_error(result, expected)
    assert not (tmp_path / "b").exists()
