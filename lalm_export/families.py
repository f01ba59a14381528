"""The one table of model families. Wrappers, export, runtime metadata and benchmarks
read it; adding a family is adding a row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lalm_export.errors import UnknownFamilyError

Role = Literal["encoder", "decoder"]
InputKind = Literal["log_mel", "raw_audio", "token_ids"]


@dataclass(frozen=True)
class FeatureExtractorSpec:
    """What the audio front end must produce for this family."""

    sampling_rate: int = 16_000
    chunk_seconds: float | None = None  # Whisper pads/trims to 30 s; raw-audio families do not


@dataclass(frozen=True)
class FamilySpec:
    name: str
    role: Role
    model_class: str  # transformers class name (resolved lazily to keep imports cheap)
    input_kind: InputKind
    input_name: str  # forward() keyword and ONNX input name
    output_name: str  # the final output in ONNX (and the HF ModelOutput field)
    optimum_model_type: str | None  # model type for Optimum's ONNX config; None: from the checkpoint
    optimum_task: str
    submodule: str | None = None  # attribute of the loaded model that is kept (Whisper: "encoder")
    optimum_behavior: str | None = None  # Optimum config behaviour for that submodule
    default_lora_targets: tuple[str, ...] | None = None  # None: peft's per-architecture default
    default_checkpoint: str = ""
    feature_extractor: FeatureExtractorSpec | None = None
    dynamic_length: bool = True  # Whisper's encoder only accepts its full 30 s window

    def model_cls(self) -> type:
        import transformers

        return getattr(transformers, self.model_class)


_AUDIO_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

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
            optimum_model_type="whisper",
            optimum_task="feature-extraction",
            submodule="encoder",
            optimum_behavior="encoder",
            default_lora_targets=_AUDIO_LORA_TARGETS,
            default_checkpoint="openai/whisper-large-v3",
            feature_extractor=FeatureExtractorSpec(chunk_seconds=30.0),
            dynamic_length=False,
        ),
        FamilySpec(
            name="hubert",
            role="encoder",
            model_class="HubertModel",
            input_kind="raw_audio",
            input_name="input_values",
            output_name="last_hidden_state",
            optimum_model_type="hubert",
            optimum_task="feature-extraction",
            default_lora_targets=_AUDIO_LORA_TARGETS,
            default_checkpoint="facebook/hubert-base-ls960",
            feature_extractor=FeatureExtractorSpec(),
        ),
        FamilySpec(
            name="wav2vec2",
            role="encoder",
            model_class="Wav2Vec2Model",
            input_kind="raw_audio",
            input_name="input_values",
            output_name="last_hidden_state",
            optimum_model_type="wav2vec2",
            optimum_task="feature-extraction",
            default_lora_targets=_AUDIO_LORA_TARGETS,
            default_checkpoint="facebook/wav2vec2-base",
            feature_extractor=FeatureExtractorSpec(),
        ),
        FamilySpec(
            name="llm",
            role="decoder",
            model_class="AutoModelForCausalLM",
            input_kind="token_ids",
            input_name="input_ids",
            output_name="logits",
            optimum_model_type=None,
            optimum_task="text-generation-with-past",
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
