"""The one table of model families. Wrappers, export, runtime metadata, the tiny test
models and the benchmark presets read it; adding a family is adding a row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from lalm_export.errors import UnknownFamilyError

Role = Literal["encoder", "decoder"]
InputKind = Literal["log_mel", "raw_audio", "stacked_log_mel", "token_ids"]


@dataclass(frozen=True)
class ConfigRecipe:
    """A transformers config class and its keyword arguments, built on demand (imports stay cheap)."""

    config_class: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    def build(self, **overrides: Any) -> Any:
        import transformers

        return getattr(transformers, self.config_class)(**{**dict(self.kwargs), **overrides})


def recipe(config_class: str, **kwargs: Any) -> ConfigRecipe:
    return ConfigRecipe(config_class, tuple(kwargs.items()))


@dataclass(frozen=True)
class FeatureExtractorSpec:
    """What the audio front end must produce for this family, and the extractor a checkpoint
    without one gets (the runtime reads its settings from the bundle)."""

    extractor_class: str = "Wav2Vec2FeatureExtractor"
    kwargs: tuple[tuple[str, Any], ...] = ()
    from_config: tuple[tuple[str, str], ...] = ()  # extractor argument <- model config attribute
    sampling_rate: int = 16_000
    chunk_seconds: float | None = None  # Whisper pads/trims to 30 s; raw-audio families do not

    def build(self, model_config: Any) -> Any:
        import transformers

        derived = {arg: getattr(model_config, attr) for arg, attr in self.from_config}
        return getattr(transformers, self.extractor_class)(**dict(self.kwargs), **derived)


@dataclass(frozen=True)
class FamilySpec:
    name: str
    role: Role
    model_class: str  # transformers class name (resolved lazily to keep imports cheap)
    input_kind: InputKind
    input_name: str  # forward() keyword and ONNX input name
    output_name: str  # the final output in ONNX (and the HF ModelOutput field)
    tiny: ConfigRecipe  # hidden 64, 2 layers: tests, the demo and the CI benchmark
    base: ConfigRecipe  # real architecture sizes (random weights): the committed benchmarks
    submodule: str | None = None  # attribute of the loaded model that is kept (Whisper: "encoder")
    default_lora_targets: tuple[str, ...] | None = None  # None: peft's per-architecture default
    default_checkpoint: str = ""
    feature_extractor: FeatureExtractorSpec | None = None
    dynamic_length: bool = True  # Whisper's encoder only accepts its full 30 s window
    # Audio samples per encoder frame for an encoder without a convolution front end in its
    # config (Whisper: a hop of 160, then a stride-2 convolution): an LALM cuts padding frames by it.
    frame_samples: int | None = None
    model_types: tuple[str, ...] = ()  # checkpoint model_type values of this family; () = any
    # Linear layers the model reads by `.weight` instead of calling: LoRA on them would train
    # nothing (refused), and a QLoRA base keeps them in full precision (a 4-bit weight cannot be read so).
    read_by_weight: tuple[str, ...] = ()
    # Further layers a QLoRA base keeps in full precision: those bitsandbytes' CPU 4-bit kernel
    # cannot run (an output size not divisible by its block).
    qlora_full_precision: tuple[str, ...] = ()

    @property
    def qlora_keep_full_precision(self) -> tuple[str, ...]:
        return (*self.read_by_weight, *self.qlora_full_precision)

    def model_cls(self) -> type:
        import transformers

        return getattr(transformers, self.model_class)


_AUDIO_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
TINY_HIDDEN = 64
TINY_VOCAB = 320  # the tiny tokenizer's vocabulary (lalm_export.demo.tiny)
# Raw-audio encoders at test size: every Linear has in_features >= 64 (bitsandbytes' CPU kernel).
_TINY_RAW_AUDIO = dict(
    hidden_size=TINY_HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    conv_dim=(64, 64, 64),
    conv_stride=(5, 4, 4),
    conv_kernel=(10, 8, 4),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    mask_time_prob=0.0,
    vocab_size=32,
)


def _raw_audio_family(
    name: str,
    model_class: str,
    config_class: str,
    checkpoint: str,
    attention_mask: bool,
    lora_targets: tuple[str, ...] = _AUDIO_LORA_TARGETS,
    read_by_weight: tuple[str, ...] = (),
    qlora_full_precision: tuple[str, ...] = (),
    **tiny: Any,
) -> FamilySpec:
    """A wav2vec2-style encoder: raw 16 kHz samples in, its hidden states out."""
    return FamilySpec(
        name=name,
        role="encoder",
        model_class=model_class,
        input_kind="raw_audio",
        input_name="input_values",
        output_name="last_hidden_state",
        tiny=recipe(config_class, **{**_TINY_RAW_AUDIO, **tiny}),
        base=recipe(config_class),  # the config defaults are the base-size model
        default_lora_targets=lora_targets,
        default_checkpoint=checkpoint,
        feature_extractor=FeatureExtractorSpec(kwargs=(("return_attention_mask", attention_mask),)),
        model_types=(name,),
        read_by_weight=read_by_weight,
        qlora_full_precision=qlora_full_precision,
    )


FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(
            name="whisper",
            role="encoder",
            model_class="WhisperModel",
            input_kind="log_mel",
            input_name="input_features",
            output_name="last_hidden_state",
            tiny=recipe(
                "WhisperConfig",
                d_model=TINY_HIDDEN,
                encoder_layers=2,
                decoder_layers=1,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=128,
                decoder_ffn_dim=128,
                num_mel_bins=80,
                max_source_positions=1500,
                max_target_positions=64,
                vocab_size=128,
                decoder_start_token_id=1,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
            ),
            # The Whisper-base encoder; the text decoder is not exported, so one small layer keeps the checkpoint light.
            base=recipe(
                "WhisperConfig",
                d_model=512,
                encoder_layers=6,
                encoder_attention_heads=8,
                encoder_ffn_dim=2048,
                num_mel_bins=80,
                decoder_layers=1,
                decoder_attention_heads=8,
                decoder_ffn_dim=2048,
                max_source_positions=1500,
            ),
            submodule="encoder",
            default_lora_targets=_AUDIO_LORA_TARGETS,
            default_checkpoint="openai/whisper-large-v3",
            feature_extractor=FeatureExtractorSpec(
                extractor_class="WhisperFeatureExtractor", from_config=(("feature_size", "num_mel_bins"),), chunk_seconds=30.0
            ),
            dynamic_length=False,
            frame_samples=320,
            model_types=("whisper",),
        ),
        _raw_audio_family("hubert", "HubertModel", "HubertConfig", "facebook/hubert-base-ls960", attention_mask=False),
        _raw_audio_family("wav2vec2", "Wav2Vec2Model", "Wav2Vec2Config", "facebook/wav2vec2-base", attention_mask=True),
        # WavLM's attention passes q/k/v/out_proj's `.weight` to F.multi_head_attention_forward
        # instead of calling them: LoRA there would train nothing, so it adapts the feed-forward.
        _raw_audio_family(
            "wavlm",
            "WavLMModel",
            "WavLMConfig",
            "microsoft/wavlm-base-plus",
            attention_mask=True,
            lora_targets=("intermediate_dense", "output_dense"),
            read_by_weight=_AUDIO_LORA_TARGETS,
            qlora_full_precision=("gru_rel_pos_linear",),
            num_buckets=32,
            max_bucket_distance=100,
        ),
        _raw_audio_family(
            "data2vec-audio",
            "Data2VecAudioModel",
            "Data2VecAudioConfig",
            "facebook/data2vec-audio-base",
            attention_mask=True,
            conv_pos_kernel_size=5,
            num_conv_pos_embeddings=2,
        ),
        FamilySpec(
            name="llm",
            role="decoder",
            model_class="AutoModelForCausalLM",
            input_kind="token_ids",
            input_name="input_ids",
            output_name="logits",
            tiny=recipe(
                "LlamaConfig",
                hidden_size=TINY_HIDDEN,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=TINY_VOCAB,
                max_position_embeddings=256,
                bos_token_id=1,
                eos_token_id=2,
                tie_word_embeddings=False,
            ),
            # Qwen2.5-0.5B's sizes.
            base=recipe(
                "Qwen2Config",
                hidden_size=896,
                intermediate_size=4864,
                num_hidden_layers=24,
                num_attention_heads=14,
                num_key_value_heads=2,
                vocab_size=151936,
                tie_word_embeddings=True,
                max_position_embeddings=4096,
                bos_token_id=1,
                eos_token_id=2,
            ),
            default_checkpoint="Qwen/Qwen2.5-0.5B",
        ),
    )
}

ENCODER_FAMILIES = tuple(name for name, spec in FAMILIES.items() if spec.role == "encoder")


def get_family(name: str) -> FamilySpec:
    """The registry row for `name`; an unknown name lists the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise UnknownFamilyError(f"unknown model family {name!r}; known families: {known}") from None
