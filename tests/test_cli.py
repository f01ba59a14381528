"""`lalm-export` driven as a user would: a real export in a subprocess, and every user
error (in process, through `main`) as one line, a non-zero exit and nothing written."""

from __future__ import annotations

import json

import pytest
from peft import LoraConfig, get_peft_model
from transformers import Wav2Vec2Config, Wav2Vec2Model

from lalm_export.cli import main
from lalm_export.models import HubertAudioEncoder, LLMDecoder
from lalm_export.models.families import ENCODER_FAMILIES
from tests.helpers import assert_user_error, randomize_lora, run_cli, run_main


@pytest.fixture(scope="module")
def adapters(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    hubert = HubertAudioEncoder(str(checkpoints["hubert"]), use_lora=True)
    randomize_lora(hubert)
    hubert.save_lora_weights(root / "hubert")
    LLMDecoder(str(checkpoints["llm"]), use_lora=True).save_lora_weights(root / "llm")
    wider = Wav2Vec2Model(
        Wav2Vec2Config(
            hidden_size=96,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=128,
            conv_dim=(64, 64),
            conv_stride=(5, 4),
            conv_kernel=(10, 8),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
        )
    )
    get_peft_model(wider, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(str(root / "wider"))
    corrupt = root / "corrupt"
    hubert.save_lora_weights(corrupt)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    return root


def test_export_with_json_manifest(checkpoints, adapters, tmp_path):
    out = tmp_path / "bundle"
    result = run_cli("--encoder", "hubert", "--model", checkpoints["hubert"], "--adapter", adapters / "hubert", "--output", out, "--json")
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["source"]["merge"] == "lora" and manifest["parity"]["passed"]
    for stage in ("[1/6] load", "[2/6] merge", "[3/6] export", "[4/6] precision: skipped (fp32)", "[5/6] verify", "[6/6] write"):
        assert stage in result.stderr
    assert "last_hidden_state: max-abs" in result.stderr


def test_quiet_prints_nothing(checkpoints, tmp_path):
    result = run_cli("--encoder", "hubert", "--model", checkpoints["hubert"], "--output", tmp_path / "b", "-q")
    assert result.returncode == 0 and result.stdout == "" and result.stderr.strip() == ""


def test_help_explains_every_flag(capsys):
    result = run_main(main, "--help", capsys=capsys)
    assert result.returncode == 0
    for flag in (
        "--encoder",
        "--decoder",
        "--model",
        "--adapter",
        "--qlora",
        "--weights",
        "--opset",
        "--decoder-graph",
        "--int4-method",
        "--int4-block-size",
        "--int4-lm-head",
        "--calibration",
        "--all-hidden-states",
        "--force",
        "--no-verify",
        "--atol",
        "-q",
        "--json",
        "examples:",
    ):
        assert flag in result.stdout


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("missing model", "does not exist"),
        ("hub id while offline", "pass a local checkpoint folder with --model"),
        ("missing adapter", "adapter folder"),
        ("adapter of another family", "trained for the 'hubert' family"),
        ("adapter of another base", "has shape"),
        ("adapter targeting other modules", "no Linear layer"),
        ("corrupt adapter", "truncated or corrupt"),
        ("adapter and weights", "--adapter and --weights together"),
        ("qlora without adapter", "pass --adapter too"),
        ("unknown decoder arch", "known: auto"),
        ("wrong decoder arch", "is a 'llama' model"),
        ("parity failure", "disagrees with eager PyTorch fp32"),
    ],
)
def test_user_errors(case, fragment, checkpoints, adapters, tmp_path, capsys):
    out = tmp_path / "out"
    args = {
        "missing model": ["--encoder", "hubert", "--model", tmp_path / "nope"],
        "hub id while offline": ["--encoder", "hubert"],
        "missing adapter": ["--encoder", "hubert", "--model", checkpoints["hubert"], "--adapter", tmp_path / "nope"],
        "adapter of another family": ["--encoder", "wav2vec2", "--model", checkpoints["wav2vec2"], "--adapter", adapters / "hubert"],
        "adapter of another base": ["--encoder", "wav2vec2", "--model", checkpoints["wav2vec2"], "--adapter", adapters / "wider"],
        "adapter targeting other modules": ["--encoder", "wav2vec2", "--model", checkpoints["wav2vec2"], "--adapter", adapters / "llm"],
        "corrupt adapter": ["--encoder", "hubert", "--model", checkpoints["hubert"], "--adapter", adapters / "corrupt"],
        "adapter and weights": ["--encoder", "hubert", "--model", checkpoints["hubert"], "--adapter", adapters / "hubert", "--weights", tmp_path],
        "qlora without adapter": ["--encoder", "hubert", "--model", checkpoints["hubert"], "--qlora"],
        "unknown decoder arch": ["--decoder", "gpt-9", "--model", checkpoints["llm"]],
        "wrong decoder arch": ["--decoder", "qwen2", "--model", checkpoints["llm"]],
        "parity failure": ["--encoder", "hubert", "--model", checkpoints["hubert"], "--rtol", "1e-15"],
    }[case]
    if case == "adapter targeting other modules":
        (adapters / "llm" / "lalm_adapter.json").rename(adapters / "llm_meta.json")  # as a plain peft folder
    try:
        result = run_main(main, *args, "--output", out, capsys=capsys)
    finally:
        if case == "adapter targeting other modules":
            (adapters / "llm_meta.json").rename(adapters / "llm" / "lalm_adapter.json")
    assert_user_error(result, fragment)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_existing_output_is_refused(checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(run_main(main, "--encoder", "hubert", "--model", checkpoints["hubert"], "--output", out, capsys=capsys), "pass --force")
    assert (out / "keep.txt").read_text() == "mine"


def test_unknown_encoder_lists_the_known_ones(tmp_path, capsys):
    result = run_main(main, "--encoder", "conformer", "--output", tmp_path / "o", capsys=capsys)
    assert result.returncode == 2 and all(family in result.stderr for family in ENCODER_FAMILIES)


def test_qlora_without_bitsandbytes(checkpoints, adapters, tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "bitsandbytes.py").write_text("raise ImportError('bitsandbytes is not installed')\n")
    result = run_cli(
        "--encoder",
        "hubert",
        "--model",
        checkpoints["hubert"],
        "--adapter",
        adapters / "hubert",
        "--qlora",
        "--output",
        tmp_path / "o",
        env={"PYTHONPATH": str(blocker)},
    )
    assert_user_error(result, "QLoRA needs bitsandbytes")
