"""`python -m runtime.infer` and the runtime API on exported bundles, against the eager models."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import AutoFeatureExtractor, AutoModelForCausalLM

from lalm_export.export.component import ExportOptions, export_bundle
from lalm_export.models.families import FAMILIES, get_family
from lalm_export.models.loading import load_family_model
from lalm_export.parity.signals import speech_like
from runtime.api import load
from runtime.generation import GenerationOptions
from runtime.infer import main as infer_main
from tests.helpers import REPO, assert_user_error, relative_error, run_cli, run_main

INFER = "runtime.infer"


@pytest.fixture(scope="module")
def bundles(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    for family in FAMILIES:
        export_bundle(ExportOptions(family=family, model=str(checkpoints[family]), output=root / family), quiet=True)
    return root


def test_runtime_imports_and_runs_without_torch(bundles):
    code = (
        "import sys, numpy as np\n"
        "import runtime.infer, runtime.api\n"
        f"model = runtime.api.load({str(bundles / 'hubert')!r})\n"
        "model.encode_arrays([np.zeros(16000, dtype=np.float32) + 0.1])\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'lalm_export'))\n"
        "print(bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_encoder_cli_matches_eager_on_speech(encoder_family, bundles, checkpoints, tmp_path, capsys):
    family = encoder_family
    samples = speech_like(3.0)
    sf.write(tmp_path / "speech.wav", samples, 16_000, subtype="FLOAT")
    result = run_main(infer_main, bundles / family, "--audio", tmp_path / "speech.wav", "--output", tmp_path / "out.npz", capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "speech.wav: 3.00 s audio" in result.stderr
    ours = np.load(tmp_path / "out.npz")["speech.wav"]
    extractor = AutoFeatureExtractor.from_pretrained(str(checkpoints[family]))
    features = extractor(samples, sampling_rate=16_000, return_tensors="pt")
    model = load_family_model(get_family(family), str(checkpoints[family])).eval()
    with torch.no_grad():
        eager = model(**{get_family(family).input_name: features[get_family(family).input_name]}).last_hidden_state[0]
    assert ours.shape == tuple(eager.shape)
    assert relative_error(eager, ours) <= 1e-3


def test_stereo_44k_flac_gives_the_right_number_of_frames(bundles, checkpoints, tmp_path):
    stereo = np.stack([speech_like(2.5, 44_100), speech_like(2.5, 44_100, seed=2)], axis=1)
    sf.write(tmp_path / "stereo.flac", stereo, 44_100)
    runner = load(bundles / "wav2vec2")
    (encoded,) = runner.encode_files([tmp_path / "stereo.flac"])
    length = 40_000  # 2.5 s at 16 kHz
    config = load_family_model(get_family("wav2vec2"), str(checkpoints["wav2vec2"])).config
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        length = (length - kernel) // stride + 1
    assert encoded.hidden_states.shape == (length, 64)


def test_files_of_different_lengths_match_each_alone(bundles):
    runner = load(bundles / "wav2vec2")
    clips = [speech_like(1.0), speech_like(1.7, seed=3), speech_like(1.0, seed=4)]
    together = runner.encode_arrays(clips)
    for clip, result in zip(clips, together):
        (alone,) = runner.encode_arrays([clip])
        np.testing.assert_allclose(result.hidden_states, alone.hidden_states, rtol=1e-5, atol=1e-5)


def eager_greedy(checkpoint, prompt_ids: list[int], steps: int) -> list[int]:
    """Greedy decoding by full recomputation: no cache, no generate()."""
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt_ids) :].tolist()


def test_decoder_json_tokens_equal_eager_greedy(bundles, checkpoints):
    prompt = "The capital of France is"
    result = run_cli(bundles / "llm", "--prompt", prompt, "--max-new-tokens", "32", "--ignore-eos", "--json", module=INFER)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    generator = load(bundles / "llm")
    expected = eager_greedy(checkpoints["llm"], generator.tokenizer.encode(prompt).ids, 32)
    assert record["tokens"] == expected
    assert record["time_to_first_token_s"] > 0 and record["tokens_per_s"] > 0
    assert record["text"] == generator.decode(expected)


def test_streamed_text_equals_the_completion(bundles, capsys):
    result = run_main(infer_main, bundles / "llm", "--prompt", "hello", "--max-new-tokens", "12", "--ignore-eos", capsys=capsys)
    assert result.returncode == 0, result.stderr
    generator = load(bundles / "llm")
    (completion,) = generator.complete(["hello"], GenerationOptions(max_new_tokens=12, stop_at_eos=False))
    assert result.stdout == completion.text + "\n"


def test_sampling_is_reproducible_with_a_seed(bundles):
    generator = load(bundles / "llm")
    options = GenerationOptions(max_new_tokens=16, stop_at_eos=False, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    first = generator.complete(["one two"], options)[0].tokens
    again = generator.complete(["one two"], options)[0].tokens
    other = generator.complete(["one two"], GenerationOptions(**{**options.__dict__, "seed": 8}))[0].tokens
    greedy = generator.complete(["one two"], GenerationOptions(max_new_tokens=16, stop_at_eos=False))[0].tokens
    assert first == again
    assert first != other and first != greedy


def test_batch_of_prompts_equals_each_alone(bundles):
    generator = load(bundles / "llm")
    prompts = ["hi", "the quick brown fox jumps", "one two three"]
    options = GenerationOptions(max_new_tokens=20, stop_at_eos=False)
    batch = generator.complete(prompts, options)
    for prompt, completion in zip(prompts, batch):
        assert completion.tokens == generator.complete([prompt], options)[0].tokens


def test_io_binding_path_gives_the_same_tokens(bundles):
    """The CUDA path (IO binding, KV cache in pre-allocated buffers) run with the CPU device."""
    from runtime.generation import generate
    from runtime.ort_backends import OrtDecoderBackend

    generator = load(bundles / "llm")
    ids, mask = generator.encode_prompts(["hi", "the quick brown fox"])
    options = GenerationOptions(max_new_tokens=16, stop_at_eos=False)
    plain = generate(OrtDecoderBackend(generator.session), ids, mask, options)
    bound_backend = OrtDecoderBackend(generator.session, binding_device="cpu")
    bound = generate(bound_backend, ids, mask, options)
    np.testing.assert_array_equal(plain, bound)
    assert bound_backend.kv is not None and bound_backend.kv.length == ids.shape[1] + 15


def test_kv_buffers_are_allocated_once_and_reused_every_step(bundles):
    from runtime.ort_backends import OrtDecoderBackend

    generator = load(bundles / "llm")
    ids, mask = generator.encode_prompts(["the quick brown fox"])
    backend = OrtDecoderBackend(generator.session, binding_device="cpu")
    backend.reserve(ids.shape[1] + 12)
    backend.prefill(ids, mask)
    pointers = backend.kv.buffer_pointers()
    assert len(pointers) == 2 * len(backend.past_names)  # a ping-pong pair per cache tensor
    for _ in range(11):
        backend.decode_step(np.array([5]))
        assert backend.kv.buffer_pointers() == pointers
    assert backend.kv.allocations == 1 and backend.kv.capacity == ids.shape[1] + 12


def test_kv_buffers_grow_past_their_capacity_without_changing_logits(bundles):
    """Outgrowing the reserved length moves the cache to a larger pair mid-generation; every
    step's logits stay those of the unbound backend."""
    from runtime.ort_backends import OrtDecoderBackend

    generator = load(bundles / "llm")
    ids = np.random.default_rng(0).integers(3, 300, size=(1, 100))
    plain, bound = OrtDecoderBackend(generator.session), OrtDecoderBackend(generator.session, binding_device="cpu")
    bound.reserve(110)
    pairs = [(plain.prefill(ids, np.ones_like(ids)), bound.prefill(ids, np.ones_like(ids)))]
    for step in range(40):
        token = np.array([5 + step])
        pairs.append((plain.decode_step(token), bound.decode_step(token)))
    assert bound.kv.allocations == 2 and bound.kv.capacity >= 140
    for expected, actual in pairs:
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)


def test_saved_optimized_graph_is_reused(bundles, tmp_path):
    import shutil

    from runtime.sessions import SessionOptions

    bundle = tmp_path / "llm"
    shutil.copytree(bundles / "llm", bundle)
    options = GenerationOptions(max_new_tokens=10, stop_at_eos=False)
    first = load(bundle, SessionOptions(save_optimized=True))
    assert (bundle / "model.optimized.onnx").is_file()
    reused = load(bundle)
    assert reused.graph_path.name == "model.optimized.onnx"
    assert reused.complete(["hi"], options)[0].tokens == first.complete(["hi"], options)[0].tokens
    with open(bundle / "model.optimized.onnx", "ab") as handle:
        handle.write(b"\0")  # a modified optimized graph is ignored, never run
    assert load(bundle).graph_path.name == "model.onnx"


def test_stop_string_ends_the_completion(bundles):
    generator = load(bundles / "llm")
    options = GenerationOptions(max_new_tokens=24, stop_at_eos=False)
    full = generator.complete(["hello"], options)[0].text
    stop = full[3:5]
    cut = generator.complete(["hello"], options, stop_strings=[stop])[0]
    assert cut.text == full[: full.index(stop)]


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("missing bundle", "does not exist"),
        ("not a bundle", "is not a bundle"),
        ("tampered graph", "does not match the sha256"),
        ("future format", "format version 99"),
        ("prompt to encoder", "takes --audio, not --prompt"),
        ("audio to decoder", "takes --prompt, not --audio"),
        pytest.param(
            "cuda unavailable",
            "CUDAExecutionProvider is not available",
            marks=pytest.mark.skipif("CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(), reason="CUDA is available here"),
        ),
        ("unreadable audio", "not a readable audio file"),
        ("output exists", "pass --force"),
    ],
)
def test_user_errors(case, fragment, bundles, tmp_path, capsys):
    import shutil

    wav = tmp_path / "a.wav"
    sf.write(wav, speech_like(1.0), 16_000)
    encoder = tmp_path / "encoder"
    shutil.copytree(bundles / "hubert", encoder)
    out = tmp_path / "out.npz"
    if case == "tampered graph":
        with open(encoder / "model.onnx", "ab") as handle:
            handle.write(b"\0")
    if case == "future format":
        manifest = json.loads((encoder / "manifest.json").read_text())
        (encoder / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    if case == "unreadable audio":
        wav.write_text("text")
    if case == "output exists":
        out.write_bytes(b"keep")
    args = {
        "missing bundle": [tmp_path / "nope", "--audio", wav, "--output", out],
        "not a bundle": [tmp_path, "--audio", wav, "--output", out],
        "prompt to encoder": [encoder, "--prompt", "hi"],
        "audio to decoder": [bundles / "llm", "--audio", wav],
        "cuda unavailable": [encoder, "--provider", "cuda", "--audio", wav, "--output", out],
    }.get(case, [encoder, "--audio", wav, "--output", out])
    result = run_main(infer_main, *args, capsys=capsys)
    assert_user_error(result, fragment)
    if case == "output exists":
        assert out.read_bytes() == b"keep"
    else:
        assert not out.exists()


def test_encoder_io_binding_path_matches_the_plain_run(bundles):
    """The CUDA encoder path (input and outputs bound on the device) run with the CPU device."""
    import onnxruntime as ort

    runner = load(bundles / "wav2vec2")
    clips = [np.random.default_rng(0).standard_normal(16_000).astype(np.float32) * 0.1]
    plain = runner.encode_arrays(clips)[0].hidden_states
    runner.binding_device = "cpu"
    bound = runner.encode_arrays(clips)[0].hidden_states
    np.testing.assert_array_equal(plain, bound)
    batch = np.stack(clips)
    outputs = runner.run_on_device(ort.OrtValue.ortvalue_from_numpy(batch, "cpu", 0))
    assert all(value.device_name() == "cpu" for value in outputs)
    runner.binding_device = None
    np.testing.assert_array_equal(outputs[0].numpy(), runner.run_batch(batch)["last_hidden_state"])


def test_ctrl_c_during_a_long_model_call_exits_at_once_with_nothing_written(bundles, tmp_path, monkeypatch, capsys):
    """A model call that never returns by itself (as a long ONNX Runtime call holds the thread
    that made it): SIGINT still ends runtime.infer, with 130 and no --output."""
    import os
    import signal
    import threading

    from runtime.api import EncoderRunner

    started, release = threading.Event(), threading.Event()

    def stuck(self, paths):
        started.set()
        release.wait()
        return []

    monkeypatch.setattr(EncoderRunner, "encode_files", stuck)
    # As in a terminal: a process started in the background by a shell without job control
    # inherits SIGINT ignored (and Python then installs no handler), where Ctrl-C cannot reach it.
    default = signal.signal(signal.SIGINT, signal.default_int_handler)
    audio = tmp_path / "a.wav"
    sf.write(audio, speech_like(1.0), 16_000)
    interrupter = threading.Thread(target=lambda: started.wait() and os.kill(os.getpid(), signal.SIGINT))
    interrupter.start()
    try:
        outcome = run_main(infer_main, bundles / "wav2vec2", "--audio", audio, "--output", tmp_path / "f.npz", capsys=capsys)
    finally:
        release.set()
        interrupter.join()
        signal.signal(signal.SIGINT, default)
    assert outcome.returncode == 130 and "runtime.infer: interrupted" in outcome.stderr
    assert not (tmp_path / "f.npz").exists()
