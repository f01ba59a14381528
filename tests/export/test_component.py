"""Export end to end: merged graphs match the eager model; QLoRA is merged faithfully;
the bundle is complete and self-describing; the parity gate refuses a bad graph."""

from __future__ import annotations

import json
import shutil
import stat

import numpy as np
import onnxruntime as ort
import pytest
import torch
from peft import LoraConfig, get_peft_model

from lalm_export.demo.tiny import tiny_input
from lalm_export.errors import OutputExistsError, ParityError
from lalm_export.export.component import ExportOptions, export_bundle
from lalm_export.io import current_umask
from lalm_export.models import ENCODER_CLASSES, LLMDecoder
from lalm_export.models.families import get_family
from lalm_export.models.loading import load_family_model
from lalm_export.models.merge import merge_adapter_into, read_lora_pairs
from lalm_export.parity.bounds import FP32_RELATIVE
from runtime.generation import GenerationOptions, generate
from runtime.manifest import sha256_of
from runtime.ort_backends import OrtDecoderBackend
from tests.helpers import OLD_BUNDLES, randomize_lora, relative_error, run_encoder


def lora_wrapper(family, checkpoints, **kwargs):
    model = ENCODER_CLASSES[family](str(checkpoints[family]), use_lora=True, lora_dropout=0.0, **kwargs)
    randomize_lora(model)
    return model


def test_encoder_lora_bundle_matches_the_eager_adapter(encoder_family, checkpoints, tmp_path):
    wrapper = lora_wrapper(encoder_family, checkpoints)
    wrapper.save_lora_weights(tmp_path / "ckpt")
    bundle = tmp_path / "bundle"
    manifest = export_bundle(ExportOptions(family=encoder_family, model=str(checkpoints[encoder_family]), adapter=tmp_path / "ckpt", output=bundle), quiet=True)
    assert manifest.source.merge == "lora" and manifest.parity["passed"]
    for batch, seconds in ((1, 1.0), (3, 0.7)):
        x = tiny_input(encoder_family, batch=batch, seconds=seconds, seed=11)
        wrapper.set_inference_mode()
        eager = wrapper.inference(x)[-1]
        onnx = run_encoder(bundle, x)["last_hidden_state"]
        assert relative_error(eager, onnx) <= FP32_RELATIVE


def test_plain_peft_adapter_and_all_hidden_states(checkpoints, tmp_path):
    base = load_family_model(get_family("hubert"), str(checkpoints["hubert"]))
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "feed_forward.output_dense"]))
    randomize_lora(peft_model, seed=3)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    bundle = tmp_path / "bundle"
    export_bundle(
        ExportOptions(family="hubert", model=str(checkpoints["hubert"]), adapter=tmp_path / "peft", output=bundle, all_hidden_states=True),
        quiet=True,
    )
    x = tiny_input("hubert", batch=2, seconds=0.8, seed=4)
    with torch.no_grad():
        eager = peft_model.eval()(input_values=x, output_hidden_states=True).hidden_states
    onnx = run_encoder(bundle, x)
    assert [k for k in onnx if k.startswith("hidden_states.")] == [f"hidden_states.{i}" for i in range(len(eager))]
    for i, layer in enumerate(eager):
        assert relative_error(layer, onnx[f"hidden_states.{i}"]) <= FP32_RELATIVE


def test_decoder_lora_bundle_generates_the_same_greedy_tokens(checkpoints, tmp_path):
    wrapper = LLMDecoder(str(checkpoints["llm"]), use_lora=True, lora_dropout=0.0)
    randomize_lora(wrapper, std=0.3)
    wrapper.save_lora_weights(tmp_path / "ckpt")
    bundle = tmp_path / "bundle"
    manifest = export_bundle(ExportOptions(family="llm", model=str(checkpoints["llm"]), adapter=tmp_path / "ckpt", output=bundle), quiet=True)
    assert manifest.parity["greedy"]["agreement"] == 1.0
    assert (bundle / "tokenizer.json").is_file() and (bundle / "generation_config.json").is_file()
    ids = wrapper.tokenizer("The capital of France is", return_tensors="pt").input_ids
    wrapper.eval()
    hf = wrapper.generate(input_ids=ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, ids.shape[1] :]
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    ours = generate(OrtDecoderBackend(session), ids.numpy(), np.ones_like(ids.numpy()), GenerationOptions(max_new_tokens=24))[0]
    assert ours.tolist() == hf.tolist()


def fp32_path_for_4bit(model: torch.nn.Module) -> None:
    """bitsandbytes' CPU inference kernel computes in bf16 on CPUs with AVX512-BF16; in training
    mode a Linear4bit dequantizes to fp32 and multiplies in fp32, which is what the QLoRA
    adapter was trained with. Put only those layers in training mode (no dropout elsewhere)."""
    import bitsandbytes as bnb

    model.eval()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.train()


def test_qlora_merge_reproduces_the_4bit_model(encoder_family, checkpoints, tmp_path, capsys):
    family = encoder_family
    qlora = ENCODER_CLASSES[family](str(checkpoints[family]), use_qlora=True, lora_dropout=0.0)
    randomize_lora(qlora, seed=5)
    qlora.save_lora_weights(tmp_path / "ckpt")
    x = tiny_input(family, batch=1, seconds=1.0, seed=8)
    fp32_path_for_4bit(qlora)
    with torch.no_grad():
        reference = qlora(x)[-1]

    bundle = tmp_path / "bundle"
    manifest = export_bundle(ExportOptions(family=family, model=str(checkpoints[family]), adapter=tmp_path / "ckpt", output=bundle), quiet=True)
    assert manifest.source.merge == "qlora-dequantized"
    faithful = relative_error(reference, run_encoder(bundle, x)["last_hidden_state"])

    naive_model = load_family_model(get_family(family), str(checkpoints[family])).eval()
    merge_adapter_into(naive_model, read_lora_pairs(tmp_path / "ckpt", naive_model))
    with torch.no_grad():
        naive = relative_error(reference, naive_model(**{get_family(family).input_name: x}).last_hidden_state)
    with capsys.disabled():
        print(f"\n{family} QLoRA vs 4-bit model: dequantized merge {faithful:.2e}, naive full-precision merge {naive:.2e}")
    assert faithful * 10 <= naive
    assert faithful <= 1e-4


def test_decoder_qlora_merge_is_faithful(checkpoints, tmp_path):
    qlora = LLMDecoder(str(checkpoints["llm"]), use_qlora=True, lora_dropout=0.0)
    randomize_lora(qlora, std=0.3)
    qlora.save_lora_weights(tmp_path / "ckpt")
    ids = qlora.tokenizer("hello, how are you? one two three", return_tensors="pt").input_ids
    fp32_path_for_4bit(qlora)
    with torch.no_grad():
        reference = qlora(ids).logits
    bundle = tmp_path / "bundle"
    export_bundle(ExportOptions(family="llm", model=str(checkpoints["llm"]), adapter=tmp_path / "ckpt", output=bundle), quiet=True)
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    backend = OrtDecoderBackend(session)
    onnx_last = backend.prefill(ids.numpy(), np.ones_like(ids.numpy()))
    naive_model = load_family_model(get_family("llm"), str(checkpoints["llm"])).eval()
    merge_adapter_into(naive_model, read_lora_pairs(tmp_path / "ckpt", naive_model))
    with torch.no_grad():
        naive_last = naive_model(ids).logits[:, -1]
    faithful = relative_error(reference[:, -1], onnx_last)
    naive = relative_error(reference[:, -1], naive_last)
    assert faithful * 10 <= naive, (faithful, naive)


def test_bundle_is_self_describing(checkpoints, tmp_path):
    bundle = tmp_path / "bundle"
    export_bundle(ExportOptions(family="wav2vec2", model=str(checkpoints["wav2vec2"]), output=bundle), quiet=True)
    data = json.loads((bundle / "manifest.json").read_text())
    assert data["format_version"] == 1 and data["family"] == "wav2vec2" and data["role"] == "encoder"
    graph = data["graphs"]["model"]
    assert graph["sha256"] == sha256_of(bundle / graph["path"])
    assert graph["inputs"][0] == {"name": "input_values", "dtype": "float32", "shape": ["batch_size", "sequence_length"]}
    assert graph["outputs"][0]["name"] == "last_hidden_state"
    assert data["source"]["merge"] == "none" and data["opset"] == 18 and data["dtype"] == "float32"
    assert {"torch", "transformers", "onnxruntime"} <= set(data["libraries"])
    assert data["parity"]["passed"] and len(data["parity"]["cases"]) >= 4
    assert (bundle / "preprocessor_config.json").is_file() and (bundle / "config.json").is_file()
    # the folder gets the user's umask, as its files do (not the 0700 of a temporary folder)
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o777 & ~current_umask()
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no temporary folder left behind


def test_parity_gate_refuses_and_writes_nothing(checkpoints, tmp_path):
    with pytest.raises(ParityError, match=r"last_hidden_state: max-abs .* relative .* \(tolerance 1e-12\) FAIL"):
        export_bundle(ExportOptions(family="hubert", model=str(checkpoints["hubert"]), output=tmp_path / "b", rtol=1e-12), quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_no_verify_is_recorded(checkpoints, tmp_path):
    manifest = export_bundle(ExportOptions(family="hubert", model=str(checkpoints["hubert"]), output=tmp_path / "b", verify=False), quiet=True)
    assert manifest.parity == {"verified": False, "reason": "--no-verify"}


def test_force_replaces_only_a_complete_bundle(checkpoints, tmp_path):
    bundle = tmp_path / "b"
    export_bundle(ExportOptions(family="hubert", model=str(checkpoints["hubert"]), output=bundle), quiet=True)
    before = (bundle / "manifest.json").read_text()
    with pytest.raises(ParityError):
        export_bundle(ExportOptions(family="hubert", model=str(checkpoints["hubert"]), output=bundle, force=True, rtol=1e-12), quiet=True)
    assert (bundle / "manifest.json").read_text() == before
    export_bundle(ExportOptions(family="hubert", model=str(checkpoints["hubert"]), output=bundle, force=True, seed=1), quiet=True)
    assert (bundle / "manifest.json").read_text() != before


@pytest.mark.parametrize("written_by", ["this version", "transformers 4.57's lalm-export"])
def test_force_never_deletes_a_users_file_inside_a_bundle(written_by, checkpoints, tmp_path):
    bundle = tmp_path / "b"
    if written_by == "this version":
        export_bundle(ExportOptions(family="hubert", model=str(checkpoints["hubert"]), output=bundle), quiet=True)
    else:  # no record of its files: its graphs and the companion files exports write are its own
        shutil.copytree(OLD_BUNDLES / "hubert", bundle)
    (bundle / "notes.txt").write_text("mine")
    before = sorted(p.name for p in bundle.iterdir())
    with pytest.raises(OutputExistsError, match="also holds notes.txt, which lalm-export did not write"):
        export_bundle(ExportOptions(family="hubert", model=str(checkpoints["hubert"]), output=bundle, force=True), quiet=True)
    assert (bundle / "notes.txt").read_text() == "mine" and sorted(p.name for p in bundle.iterdir()) == before
    (bundle / "notes.txt").unlink()
    export_bundle(ExportOptions(family="hubert", model=str(checkpoints["hubert"]), output=bundle, force=True, verify=False), quiet=True)


def test_the_eager_reference_runs_without_tf32_and_restores_the_settings():
    import torch

    from lalm_export.models.eager import full_fp32

    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for convolutions
    with full_fp32():
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.allow_tf32
