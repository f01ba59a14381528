"""The audio LLM: an audio-encoder wrapper, a projector into the decoder's embedding space,
and an `LLMDecoder` fed `inputs_embeds`.

A prompt carries the audio through one placeholder token (`audio_token`), which expands to
as many positions as the clip has projected frames. Padding is never a position: a clip of
n samples gives the encoder frames its own length makes (Whisper's 30 s window is cut to
ceil(n / 320) frames), then ceil(frames / downsample) projected frames."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lalm_export.errors import AdapterMismatchError, OptionsError
from lalm_export.io import atomic_folder, read_json, read_safetensors, write_json, write_safetensors
from lalm_export.models.adapters import TrainingMode, first_mismatch, set_trainable
from lalm_export.models.audio_encoder import BaseAudioEncoder, encoder_class
from lalm_export.models.llm import LLMDecoder
from lalm_export.models.loading import model_device
from lalm_export.models.user_projector import UserProjector, build_user_projector, check_projector, projector_record

DEFAULT_AUDIO_TOKEN = "<|audio|>"
LALM_CONFIG = "lalm_config.json"
PROJECTOR_WEIGHTS = "projector.safetensors"
IGNORE = -100  # label of positions that carry no loss (audio, prompt, padding)


# A batch of 16 kHz clips: arrays or 1-D tensors of their own lengths, or one padded
# `(batch, samples)` tensor or array whose lengths come in `audio_lengths`.
AudioBatch = Sequence[np.ndarray] | Sequence[torch.Tensor] | torch.Tensor | np.ndarray


def as_clips(audio: AudioBatch, audio_lengths: Sequence[int] | torch.Tensor | None = None) -> list[np.ndarray]:
    """Each clip's own samples as float32 numpy: a padded batch is cut to `audio_lengths`
    (without them every row is taken whole)."""
    if isinstance(audio, torch.Tensor | np.ndarray):
        if audio.ndim != 2:
            raise OptionsError(
                f"audio is a batch: a list of 1-D clips or a padded (batch, samples) tensor, not a {audio.ndim}-D one; wrap a single clip in a list"
            )
        rows = audio.detach().cpu().float().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio, dtype=np.float32)
        lengths = [rows.shape[1]] * len(rows) if audio_lengths is None else [int(n) for n in audio_lengths]
        if len(lengths) != len(rows) or not all(0 < n <= rows.shape[1] for n in lengths):
            raise OptionsError(f"audio_lengths must give each of the {len(rows)} rows a length in 1..{rows.shape[1]}, not {lengths}")
        return [row[:n] for row, n in zip(rows, lengths)]
    if audio_lengths is not None:
        raise OptionsError("audio_lengths goes with a padded (batch, samples) tensor; clips of their own lengths need none")
    clips = [clip.detach().cpu().float().numpy() if isinstance(clip, torch.Tensor) else np.asarray(clip, dtype=np.float32) for clip in audio]
    if shapes := [clip.shape for clip in clips if clip.ndim != 1]:
        raise OptionsError(f"each clip is 1-D (mono samples at 16 kHz), not of shape {shapes[0]}; mix channels down first")
    return clips


@dataclass(frozen=True)
class ProjectorConfig:
    """Encoder frames → decoder embeddings: stack `downsample` frames, then a two-layer MLP
    (`hidden_size` wide; None: the decoder's hidden size). `layer_weights`: a learned
    softmax-weighted sum over every encoder layer instead of the final layer alone."""

    downsample: int = 4
    hidden_size: int | None = None
    layer_weights: bool = False

    def validate(self) -> None:
        if self.downsample < 1:
            raise OptionsError(f"projector downsample must be at least 1, not {self.downsample}")
        if self.hidden_size is not None and self.hidden_size < 1:
            raise OptionsError(f"projector hidden_size must be positive, not {self.hidden_size}")


class AudioProjector(nn.Module):
    def __init__(self, encoder_hidden: int, encoder_layers: int, decoder_hidden: int, config: ProjectorConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        width = config.hidden_size or decoder_hidden
        self.layer_weights = nn.Parameter(torch.zeros(encoder_layers + 1)) if config.layer_weights else None
        # Stacking k frames and a Linear over them is a convolution of kernel k and stride k:
        # written so, it needs no shape arithmetic, and an exported graph takes any length.
        k = config.downsample
        self.stack = nn.Conv1d(encoder_hidden, width, kernel_size=k, stride=k)
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(width, decoder_hidden))

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """Every encoder layer `(batch, frames, hidden)` → `(batch, ceil(frames / k), decoder hidden)`."""
        if self.layer_weights is not None:
            weights = torch.softmax(self.layer_weights, dim=0)
            x = sum(w * h for w, h in zip(weights, hidden_states))
        else:
            x = hidden_states[-1]
        k = self.config.downsample
        stacked = self.stack(nn.functional.pad(x.transpose(1, 2), (0, k - 1)))  # ceil(frames / k) outputs
        return self.mlp(stacked.transpose(1, 2))

    def frames(self, encoder_frames: Any) -> Any:
        """Projected frames of `encoder_frames` (an int, or an int64 tensor inside an exported graph)."""
        k = self.config.downsample
        return (encoder_frames + k - 1) // k


def encoder_frames(config: Any, samples: Any, frame_samples: int | None) -> Any:
    """Encoder frames a clip of `samples` makes (an int, or an int64 tensor inside an exported
    graph): through the convolution front end in the config (`conv_kernel`, `conv_stride`),
    else `frame_samples` per frame up to the encoder's window."""
    kernels, strides = getattr(config, "conv_kernel", None), getattr(config, "conv_stride", None)
    if kernels and strides:
        length = samples
        for kernel, stride in zip(kernels, strides):
            length = (length - int(kernel)) // int(stride) + 1
        return length.clamp(min=0) if isinstance(length, torch.Tensor) else max(length, 0)
    if not frame_samples:
        raise OptionsError(f"no frame rule for a {config.model_type} encoder: its registry row needs frame_samples")
    frames = (samples + frame_samples - 1) // frame_samples
    window = int(getattr(config, "max_source_positions", 1 << 30))
    return frames.clamp(max=window) if isinstance(frames, torch.Tensor) else min(frames, window)


class LALM(nn.Module):
    """`encoder` (any audio-encoder wrapper, any mode) → projector (always trainable) →
    `decoder` (an `LLMDecoder`, any mode), with `audio_token` in prompts standing for the audio.
    The projector is this package's MLP (`ProjectorConfig`) or any module of the user's
    (`lalm_export.models.user_projector` says what it must do to be saved and exported)."""

    def __init__(
        self,
        encoder: BaseAudioEncoder,
        decoder: LLMDecoder,
        projector: ProjectorConfig | nn.Module = ProjectorConfig(),
        audio_token: str = DEFAULT_AUDIO_TOKEN,
        prompt: str = f"{DEFAULT_AUDIO_TOKEN}Transcribe the audio:",
    ) -> None:
        super().__init__()
        if audio_token not in prompt:
            raise OptionsError(f"the default prompt must contain the audio token {audio_token!r}")
        self.encoder, self.decoder = encoder, decoder
        self.audio_token, self.prompt = audio_token, prompt
        self.audio_token_id = add_audio_token(decoder, audio_token)
        encoder_config = encoder.encoder.config
        if isinstance(projector, ProjectorConfig):
            projector = AudioProjector(encoder.get_hidden_size(), int(encoder_config.num_hidden_layers), decoder.get_hidden_size(), projector)
        elif not isinstance(projector, AudioProjector | UserProjector):  # a user's module (`build_projector` checks rebuilt ones)
            projector = UserProjector(projector)
            check_projector(projector, encoder.get_hidden_size(), decoder.get_hidden_size())
        self.projector = projector
        self.feature_config = encoder_feature_config_for(encoder.model_name, encoder.spec, encoder.encoder.config)

    # --- audio --------------------------------------------------------------------------

    def encoder_inputs(self, clips: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[int]]:
        """The encoder's input for a batch of 16 kHz clips (raw audio zero-padded to the
        longest, or log-mel windows) and each clip's own encoder frame count."""
        from runtime.audio import check_samples, features_for

        clips = [check_samples(np.asarray(c), f"clip {i}") for i, c in enumerate(clips)]
        features = [features_for(self.encoder.spec.input_kind, clip, self.feature_config) for clip in clips]
        longest = max(f.shape[-1] for f in features)
        batch = np.stack([np.pad(f, [(0, 0)] * (f.ndim - 1) + [(0, longest - f.shape[-1])]) for f in features])
        frames = [encoder_frames(self.encoder.encoder.config, len(c), self.encoder.spec.frame_samples) for c in clips]
        return torch.from_numpy(batch.astype(np.float32)), frames

    def audio_features(self, clips: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Each clip's projected frames `(frames, decoder hidden)`, padding cut."""
        inputs, frames = self.encoder_inputs(clips)
        weight = next(self.encoder.parameters())  # a model moved to a GPU or cast to bf16 takes its inputs there
        projected = self.projector(self.encoder(inputs.to(weight.device, weight.dtype)))
        return [projected[i, : self.projector.frames(n)] for i, n in enumerate(frames)]

    # --- prompts ------------------------------------------------------------------------

    def embed_prompt(self, prompt_ids: Sequence[int], audio: torch.Tensor) -> torch.Tensor:
        """`(positions, hidden)`: the prompt's token embeddings with the audio at the placeholder."""
        ids = list(prompt_ids)
        if ids.count(self.audio_token_id) != 1:
            raise OptionsError(f"a prompt must contain the audio token {self.audio_token!r} exactly once, not {ids.count(self.audio_token_id)} times")
        at = ids.index(self.audio_token_id)
        table = self.decoder.get_input_embeddings()
        device = model_device(self.decoder.model)
        before = table(torch.tensor(ids[:at], dtype=torch.long, device=device))
        after = table(torch.tensor(ids[at + 1 :], dtype=torch.long, device=device))
        return torch.cat([before, audio.to(before.dtype), after])

    def prompt_ids(self, prompt: str | None) -> list[int]:
        text = self.prompt if prompt is None else prompt
        ids = self.decoder.tokenizer(text, add_special_tokens=True)["input_ids"]
        return list(ids)

    def training_batch(self, prompts: Sequence[str | None], targets: Sequence[str]) -> dict[str, torch.Tensor]:
        """`input_ids`, `attention_mask` and `labels` for `forward`: each prompt (None: the
        default) followed by its target text and EOS, right-padded; labels on the target and
        EOS only."""
        if len(prompts) != len(targets):
            raise OptionsError(f"{len(prompts)} prompts for {len(targets)} targets: give one prompt (or None) per target")
        tokenizer = self.decoder.tokenizer
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        rows, labels = [], []
        for prompt, target in zip(prompts, targets):
            prompt_ids, target_ids = self.prompt_ids(prompt), tokenizer(target, add_special_tokens=False)["input_ids"] + eos
            rows.append(prompt_ids + target_ids)
            labels.append([IGNORE] * len(prompt_ids) + target_ids)
        width = max(len(row) for row in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
        return {
            "input_ids": torch.tensor([row + [pad] * (width - len(row)) for row in rows]),
            "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows]),
            "labels": torch.tensor([label + [IGNORE] * (width - len(label)) for label in labels]),
        }

    def forward(
        self,
        audio: AudioBatch,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        audio_lengths: Sequence[int] | torch.Tensor | None = None,
    ) -> Any:
        """Teacher-forced decoder output (`.logits`; `.loss` with `labels`) for a batch of clips
        and token rows that each hold the audio placeholder once (`training_batch` makes them
        from texts). The placeholder becomes the clip's projected frames, which carry no loss,
        nor do labels of -100 (the prompt's, in `training_batch`). Padding (attention mask 0,
        on either side) is dropped from each row before the rows are right-padded together."""
        clips = as_clips(audio, audio_lengths)
        ids = torch.as_tensor(input_ids)
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
        if ids.ndim != 2 or ids.shape[0] != len(clips) or mask.shape != ids.shape:
            raise OptionsError(f"input_ids must be (batch, length) with one row per clip ({len(clips)}) and attention_mask of its shape")
        given = torch.full_like(ids, IGNORE) if labels is None else torch.as_tensor(labels)
        rows, row_labels = [], []
        for row, feature in enumerate(self.audio_features(clips)):
            keep = mask[row].bool()
            row_ids, row_given = ids[row][keep].tolist(), given[row][keep].tolist()
            rows.append(self.embed_prompt(row_ids, feature))  # checks the placeholder is there once
            at = row_ids.index(self.audio_token_id)
            row_labels.append(row_given[:at] + [IGNORE] * len(feature) + row_given[at + 1 :])
        width = max(len(r) for r in rows)
        embeds = torch.stack([nn.functional.pad(r, (0, 0, 0, width - len(r))) for r in rows])
        padded_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=embeds.device)
        label_tensor = torch.tensor([lab + [IGNORE] * (width - len(lab)) for lab in row_labels], device=embeds.device)
        return self.decoder.model(inputs_embeds=embeds, attention_mask=padded_mask, labels=label_tensor if labels is not None else None)

    @torch.no_grad()
    def generate(
        self,
        audio: AudioBatch,
        prompt: str | None = None,
        max_new_tokens: int = 32,
        audio_lengths: Sequence[int] | torch.Tensor | None = None,
        **options: Any,
    ) -> list[tuple[str, list[int]]]:
        """Greedy (or sampled, with `GenerationOptions` fields) text for each clip, one clip at
        a time so padding never enters: `(text, token ids)` per clip."""
        from runtime.generation import GenerationOptions

        generation = GenerationOptions(max_new_tokens=max_new_tokens, eos_token_id=self.decoder.tokenizer.eos_token_id, **options)
        results = []
        for clip in as_clips(audio, audio_lengths):
            kept, _ = self.generate_clip(clip, prompt, generation)
            results.append((self.decoder.tokenizer.decode(kept, skip_special_tokens=True), kept))
        return results

    @torch.no_grad()
    def generate_clip(self, clip: np.ndarray, prompt: str | None, options: Any) -> tuple[list[int], dict[str, float]]:
        """One clip's tokens (to the first EOS when `options.stop_at_eos`) and the time split
        into `encoder_s`, `prefill_s` and `decode_s`, as the runtime reports them."""
        import time

        from lalm_export.models.eager import EagerDecoderBackend
        from runtime.generation import PromptEmbeds, generate, until_eos

        start = time.perf_counter()
        (feature,) = self.audio_features([clip])
        embeds = self.embed_prompt(self.prompt_ids(prompt), feature)[None]
        encoded = time.perf_counter()
        marks: list[float] = []
        ones = np.ones((1, embeds.shape[1]), dtype=np.int64)
        backend = PromptEmbeds(EagerDecoderBackend(self.decoder.model), embeds)
        tokens = generate(backend, ones * 0, ones, options, on_step=lambda _: marks.append(time.perf_counter()))[0]
        end = time.perf_counter()
        first = marks[0] if marks else end
        return until_eos(tokens, options), {"encoder_s": encoded - start, "prefill_s": first - encoded, "decode_s": end - first}

    # --- modes --------------------------------------------------------------------------

    def set_training_mode(self) -> None:
        """The projector always trains; encoder and decoder as their modes say."""
        self.train()
        self.encoder.set_training_mode()
        self.decoder.train()
        set_trainable(self.decoder.model, self.decoder.mode)
        for param in self.projector.parameters():
            param.requires_grad = True

    def set_inference_mode(self) -> None:
        self.eval()
        for param in self.parameters():
            param.requires_grad = False

    # --- checkpoints --------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> None:
        """One folder: config, projector (safetensors), each component's adapter or full
        weights, the tokenizer with its audio token. The base models are referenced, not copied;
        other files of an existing folder (base models kept under it, say) stay."""
        with atomic_folder(folder, replace=True, keep_others=True) as tmp:
            write_safetensors(self.projector.state_dict(), tmp / PROJECTOR_WEIGHTS)
            self._save_component(self.encoder, tmp / "encoder")
            self._save_component(self.decoder, tmp / "decoder")
            self.decoder.tokenizer.save_pretrained(str(tmp / "tokenizer"))
            write_json(self.config_dict(Path(folder).expanduser()), tmp / LALM_CONFIG)

    def config_dict(self, folder: Path) -> dict[str, Any]:
        """`lalm_config.json` of this model saved in `folder`."""
        encoder_base, decoder_base = (base_model_reference(part.model_name, folder) for part in (self.encoder, self.decoder))
        return {
            "format": "lalm-export LALM",
            "version": 1,
            "encoder": {"family": self.encoder.family, "base_model": encoder_base, "mode": dataclasses.asdict(self.encoder.mode)},
            "decoder": {"family": self.decoder.family, "base_model": decoder_base, "mode": dataclasses.asdict(self.decoder.mode)},
            "projector": projector_record(self.projector) if isinstance(self.projector, UserProjector) else dataclasses.asdict(self.projector.config),
            "audio_token": self.audio_token,
            "audio_token_id": self.audio_token_id,
            "prompt": self.prompt,
        }

    @staticmethod
    def _save_component(component: nn.Module, folder: Path) -> None:
        if component.mode.uses_adapter:
            component.save_lora_weights(folder)
        elif component.mode.finetune:
            component.save_model_weights(folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path, trust_remote_code: bool = False) -> LALM:
        """The LALM saved in `folder`, each component in its saved mode: train on for continuous
        learning. A projector of the user's own class is imported only with `trust_remote_code`."""
        folder = Path(folder).expanduser()
        config = read_lalm_config(folder)
        encoder_mode, decoder_mode = (TrainingMode(**config[part]["mode"]) for part in ("encoder", "decoder"))
        encoder = encoder_class(config["encoder"]["family"])(config["encoder"]["base_model"], **_mode_kwargs(encoder_mode))
        decoder = LLMDecoder(config["decoder"]["base_model"], **_mode_kwargs(decoder_mode))
        projector = build_projector(
            config["projector"], encoder.get_hidden_size(), int(encoder.encoder.config.num_hidden_layers), decoder.get_hidden_size(), trust_remote_code
        )
        model = cls(encoder, decoder, projector, config["audio_token"], config["prompt"])
        if model.audio_token_id != config["audio_token_id"]:
            raise AdapterMismatchError(f"{folder}: the decoder's tokenizer gives {config['audio_token']!r} another id than when it was saved")
        for component, part in ((encoder, "encoder"), (decoder, "decoder")):
            if component.mode.uses_adapter:
                component.load_lora_weights(folder / part)
            elif component.mode.finetune:
                component.load_model_weights(folder / part)
        load_projector_weights(model.projector, folder)
        return model


def _mode_kwargs(mode: TrainingMode) -> dict[str, Any]:
    return dataclasses.asdict(mode)


def read_lalm_config(folder: Path) -> dict[str, Any]:
    """The folder's `lalm_config.json`, its base models' relative paths resolved against the folder."""
    if not (folder / LALM_CONFIG).is_file():
        raise OptionsError(f"{folder} is not an LALM folder (no {LALM_CONFIG}); pass a folder written by LALM.save_pretrained()")
    config = read_json(folder / LALM_CONFIG, "LALM config")
    if config.get("format") != "lalm-export LALM" or config.get("version") != 1:
        raise OptionsError(f"{folder / LALM_CONFIG} is not an LALM config of version 1; save the model again")
    for part in ("encoder", "decoder"):
        section = config.get(part)
        if not isinstance(section, dict) or not isinstance(section.get("base_model"), str):
            raise OptionsError(f"{folder / LALM_CONFIG} has no {part}.base_model; save the model again with LALM.save_pretrained()")
        section["base_model"] = resolve_base_model(folder, section["base_model"])
    fields = {f.name for f in dataclasses.fields(ProjectorConfig)}
    projector = config.get("projector")
    user_code = isinstance(projector, dict) and isinstance(projector.get("class"), str) and isinstance(projector.get("init"), dict)
    if not isinstance(projector, dict) or not (user_code or set(projector) <= fields):
        raise OptionsError(
            f"{folder / LALM_CONFIG}: 'projector' must hold {', '.join(sorted(fields))} (or a user projector's class and init); "
            "save the model again with LALM.save_pretrained()"
        )
    for needed in (PROJECTOR_WEIGHTS, "tokenizer"):
        if not (folder / needed).exists():
            raise OptionsError(f"{folder} has no {needed}, which an LALM folder holds; save the model again with LALM.save_pretrained()")
    return config


def build_projector(record: dict[str, Any], encoder_hidden: int, encoder_layers: int, decoder_hidden: int, trust_remote_code: bool) -> nn.Module:
    """The projector `lalm_config.json` describes, with fresh weights: this package's MLP, or a
    user's module (imported only with `trust_remote_code`, and tried on short inputs)."""
    if "class" in record:
        projector = build_user_projector(record, trust_remote_code)
        check_projector(projector, encoder_hidden, decoder_hidden)
        return projector
    return AudioProjector(encoder_hidden, encoder_layers, decoder_hidden, ProjectorConfig(**record))


def load_projector_weights(projector: nn.Module, folder: Path) -> None:
    """The saved projector's weights, refused in one line when they are not this projector's
    (saved for other encoder or decoder sizes, or edited)."""
    tensors = read_safetensors(folder / PROJECTOR_WEIGHTS)
    problem = first_mismatch({name: value.shape for name, value in projector.state_dict().items()}, tensors, str(folder / PROJECTOR_WEIGHTS))
    if problem is not None:
        raise AdapterMismatchError(f"{problem}: the projector does not fit this LALM's encoder and decoder; save the model again")
    projector.load_state_dict(tensors)


def base_model_reference(model_name: str, folder: Path) -> str:
    """How `lalm_config.json` names a base model: a local checkpoint under the LALM folder by its
    path relative to the folder (the folder can move with its bases), another local one by its
    absolute path (the current directory may change), a hub id as it is."""
    path = Path(model_name).expanduser()
    if not path.exists():
        return model_name
    try:
        return path.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def resolve_base_model(folder: Path, name: str) -> str:
    """A base model named in `lalm_config.json`: a relative path is the LALM folder's, never the
    current directory's (one that exists only there is refused); any other name is a hub id."""
    path = Path(name).expanduser()
    if path.is_absolute():
        return str(path)
    under = folder / path
    if under.exists():
        return str(under.resolve())
    if path.exists():
        raise OptionsError(
            f"{folder / LALM_CONFIG} names the base model {name!r}, a path that is not under the LALM folder: it would be read from "
            "the current directory, which may hold another checkpoint; write its absolute path there, or save the model again"
        )
    return name


def add_audio_token(decoder: LLMDecoder, token: str) -> int:
    """The placeholder's id, added to the tokenizer as a special token when missing. Its
    embedding and lm_head rows are zeros: the embedding is never read (audio frames take its
    place), and fixed rows make a reloaded model identical to the saved one."""
    tokenizer = decoder.tokenizer
    if token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [token]})
    resize_for_tokenizer(decoder.model, len(tokenizer))
    return int(tokenizer.convert_tokens_to_ids(token))


def resize_for_tokenizer(model: nn.Module, vocab: int) -> None:
    """Grow a causal LM's embedding and lm_head to `vocab` rows, the new rows zeros."""
    old = model.get_input_embeddings().num_embeddings
    if vocab <= old:
        return
    model.resize_token_embeddings(vocab, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[old:] = 0
        head = model.get_output_embeddings()
        if head is not None:
            head.weight[old:] = 0


def encoder_feature_config_for(model_name: str, spec: Any, config: Any) -> dict[str, Any]:
    """The encoder checkpoint's feature-extractor settings (the family default without one), as the runtime reads them."""
    from transformers import AutoFeatureExtractor

    try:
        extractor = AutoFeatureExtractor.from_pretrained(model_name)
    except (OSError, ValueError):
        extractor = spec.feature_extractor.build(config)
    return extractor.to_dict()
