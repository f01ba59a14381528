"""The merge as a pure function, on hand-placed weights, and against peft's own merge."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import WhisperModel

from lalm_export.errors import AdapterMismatchError
from lalm_export.models import Wav2Vec2AudioEncoder
from lalm_export.models.families import get_family
from lalm_export.models.loading import load_family_model
from lalm_export.models.merge import LoraPair, lora_delta, merge_adapter_into, merge_lora, read_adapter_for_part, read_lora_pairs
from tests.helpers import randomize_lora, relative_error, run_encoder


def test_merge_lora_on_hand_placed_weights():
    weights = {"proj.weight": torch.eye(2)}
    pair = LoraPair(a=torch.tensor([[1.0, 2.0]]), b=torch.tensor([[1.0], [0.0]]), scale=0.5)
    merged = merge_lora(weights, {"proj.weight": pair})
    torch.testing.assert_close(merged["proj.weight"], torch.tensor([[1.5, 1.0], [0.0, 1.0]]))
    torch.testing.assert_close(weights["proj.weight"], torch.eye(2))  # input untouched
    torch.testing.assert_close(lora_delta(pair), torch.tensor([[0.5, 1.0], [0.0, 0.0]], dtype=torch.float64))


def test_merge_equals_peft_merge_and_unload(checkpoints, tmp_path):
    wrapper = Wav2Vec2AudioEncoder(str(checkpoints["wav2vec2"]), use_lora=True, lora_r=4, lora_alpha=12)
    randomize_lora(wrapper)
    wrapper.save_lora_weights(tmp_path / "lora")
    ours = load_family_model(get_family("wav2vec2"), str(checkpoints["wav2vec2"]))
    merge_adapter_into(ours, read_lora_pairs(tmp_path / "lora", ours))
    theirs = wrapper.encoder.merge_and_unload()
    for name, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, rtol=1e-6, atol=1e-7)


def test_rslora_and_rank_pattern_scales(checkpoints, tmp_path):
    base = load_family_model(get_family("hubert"), str(checkpoints["hubert"]))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True, rank_pattern={"v_proj": 2})
    peft_model = get_peft_model(base, config)
    randomize_lora(peft_model)
    peft_model.save_pretrained(str(tmp_path / "rs"))
    fresh = load_family_model(get_family("hubert"), str(checkpoints["hubert"]))
    pairs = read_lora_pairs(tmp_path / "rs", fresh)
    assert pairs["encoder.layers.0.attention.q_proj.weight"].scale == pytest.approx(8 / 4**0.5)
    assert pairs["encoder.layers.0.attention.v_proj.weight"].scale == pytest.approx(8 / 2**0.5)
    merge_adapter_into(fresh, pairs)
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(fresh.state_dict()["encoder.layers.1.attention.v_proj.weight"], merged.state_dict()["encoder.layers.1.attention.v_proj.weight"])


def test_adapter_trained_on_the_full_whisper_model_fits_its_encoder(checkpoints, tmp_path):
    full = WhisperModel.from_pretrained(str(checkpoints["whisper"]))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r"encoder\.layers\.\d+\.self_attn\.(q_proj|v_proj)")
    peft_model = get_peft_model(full, config)
    randomize_lora(peft_model)
    peft_model.save_pretrained(str(tmp_path / "full"))
    encoder = load_family_model(get_family("whisper"), str(checkpoints["whisper"]))
    pairs = read_lora_pairs(tmp_path / "full", encoder)
    assert sorted(pairs)[0] == "layers.0.self_attn.q_proj.weight" and len(pairs) == 4


def test_adapter_for_modules_the_model_lacks_is_refused(checkpoints, tmp_path):
    full = WhisperModel.from_pretrained(str(checkpoints["whisper"]))
    peft_model = get_peft_model(full, LoraConfig(r=4, target_modules=["q_proj"]))  # decoder layers too
    peft_model.save_pretrained(str(tmp_path / "both"))
    encoder = load_family_model(get_family("whisper"), str(checkpoints["whisper"]))
    with pytest.raises(AdapterMismatchError, match="decoder.layers.0.*no Linear layer"):
        read_lora_pairs(tmp_path / "both", encoder)


def test_dora_adapter_is_refused(checkpoints, tmp_path):
    base = load_family_model(get_family("hubert"), str(checkpoints["hubert"]))
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "d"))
    config_path = tmp_path / "d" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_dora": True}))
    with pytest.raises(AdapterMismatchError, match="use_dora"):
        read_lora_pairs(tmp_path / "d", base)


def test_adapter_of_the_whole_whisper_model_exports_its_encoder_part(checkpoints, tmp_path):
    """The usual recipe (peft on WhisperForConditionalGeneration, q_proj/v_proj) adapts the text
    decoder too: the encoder's part is merged, the rest left out and counted in the manifest."""
    from transformers import WhisperForConditionalGeneration

    from lalm_export.export.component import ExportOptions, export_bundle

    whole = WhisperForConditionalGeneration.from_pretrained(str(checkpoints["whisper"]))
    peft_model = get_peft_model(whole, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(peft_model)
    peft_model.save_pretrained(str(tmp_path / "whole"))
    decoder_modules = sum(1 for name, _ in peft_model.named_modules() if ".decoder." in name and name.endswith(("q_proj", "v_proj")))
    manifest = export_bundle(ExportOptions(family="whisper", model=str(checkpoints["whisper"]), adapter=tmp_path / "whole", output=tmp_path / "b"), quiet=True)
    assert manifest.parity["passed"] and manifest.extra["adapter_modules_left_out"] == decoder_modules > 0
    # the bundle's encoder is the adapted encoder of the whole model, not the base
    x = torch.randn(1, 80, 3000)
    with torch.no_grad():
        expected = peft_model.merge_and_unload().model.encoder(x).last_hidden_state
    ours = run_encoder(tmp_path / "b", x)["last_hidden_state"]
    assert relative_error(expected, ours) <= 1e-4


def test_adapter_of_the_whisper_text_decoder_alone_is_refused(checkpoints, tmp_path):
    whole = WhisperModel.from_pretrained(str(checkpoints["whisper"]))
    get_peft_model(whole, LoraConfig(r=4, target_modules=r"decoder\.layers\.\d+\.self_attn\.q_proj")).save_pretrained(str(tmp_path / "dec"))
    encoder = load_family_model(get_family("whisper"), str(checkpoints["whisper"]))
    with pytest.raises(AdapterMismatchError, match="adapts nothing in the model's encoder"):
        read_adapter_for_part(tmp_path / "dec", encoder, "encoder")
