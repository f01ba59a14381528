"""The parity gate of an LALM bundle: the exported audio encoder + projector against the
eager modules on speech-like clips, the exported decoder's logits on the same prompt, then the
greedy tokens of the whole pipeline (features → prompt with the audio in place → decoder)
against the eager pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lalm_export.models.eager import EagerDecoderBackend
from lalm_export.models.lalm_graph import MergedLalm
from lalm_export.parity.bounds import gate_tolerance
from lalm_export.parity.report import ParityReport
from lalm_export.parity.signals import speech_like
from runtime.generation import GenerationOptions, PromptEmbeds, generate
from runtime.runners.lalm import LalmRunner

GATE_TOKENS = 32  # greedy tokens compared per clip
GATE_CLIPS_S = (1.0, 1.6)  # speech-like clips, seconds: two lengths


def eager_features(merged: MergedLalm, clip: np.ndarray) -> np.ndarray:
    """The eager encoder + projector's frames of one clip, padding cut."""
    feeds = encoder_feeds(merged, clip)
    with torch.no_grad():
        projected, lengths = merged.graph(torch.from_numpy(feeds[merged.graph.spec.input_name]), torch.from_numpy(feeds["audio_lengths"]))
    return projected[0, : int(lengths[0])].numpy()


def gate_clips(seed: int) -> list[np.ndarray]:
    """The gate's speech-like clips, one per length of `GATE_CLIPS_S`."""
    return [speech_like(seconds, seed=seed + index) for index, seconds in enumerate(GATE_CLIPS_S)]


def encoder_feeds(merged: MergedLalm, clip: np.ndarray) -> dict[str, np.ndarray]:
    """The exported audio encoder's inputs for one clip: its features and its length."""
    from runtime.audio import features_for

    features = features_for(merged.graph.spec.input_kind, clip, merged.feature_config)[None].astype(np.float32)
    return {merged.graph.spec.input_name: features, "audio_lengths": np.array([len(clip)], dtype=np.int64)}


def eager_prompt(merged: MergedLalm, features: np.ndarray) -> torch.Tensor:
    """`(1, positions, hidden)`: the prompt as the eager LALM embeds it. Its rows come from the
    decoder's embedding module, as in `LALM.embed_prompt`, not from the bundle's token table: a
    table that is not what the module computes (a module that scales its rows, as Gemma's does
    on transformers 5) fails the gate."""
    prompt_ids = list(merged.tokenizer(merged.config["prompt"])["input_ids"])
    at = prompt_ids.index(int(merged.config["audio_token_id"]))
    with torch.no_grad():
        rows = merged.decoder.get_input_embeddings()(torch.tensor(prompt_ids)).float().numpy()
    return torch.from_numpy(np.concatenate([rows[:at], features, rows[at + 1 :]])[None])


def eager_tokens(merged: MergedLalm, embeds: torch.Tensor, options: GenerationOptions) -> np.ndarray:
    ones = np.ones((1, embeds.shape[1]), dtype=np.int64)
    return generate(PromptEmbeds(EagerDecoderBackend(merged.decoder), embeds), ones * 0, ones, options)[0]


def prefill_logits(merged: MergedLalm, runner: LalmRunner, embeds: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The last position's logits of the eager decoder and of the bundle's, on the same prompt
    embeddings: the decoder's own parity, apart from the audio features that feed it."""
    mask = np.ones((1, embeds.shape[1]), dtype=np.int64)
    eager = EagerDecoderBackend(merged.decoder).prefill_embeds(embeds, mask)
    return eager, runner.new_backend().prefill_embeds(embeds.numpy(), mask)


def check_lalm(
    merged: MergedLalm,
    folder: Path,
    encoder_precision: str = "fp32",
    decoder_precision: str = "fp32",
    seed: int = 0,
    provider: str = "cpu",
    min_cosine: float | None = None,
    recordings: Sequence[tuple[str, np.ndarray]] = (),
) -> ParityReport:
    """Features of each clip (relative error for fp32; a reduced precision's cosine bound, or
    `min_cosine`), the decoder's logits on the same prompt (its precision's bounds, as the
    decoder gate's), and 32 greedy tokens, all equal where every graph is fp32 (recorded
    otherwise, as for decoders). The clips: the gate's speech-like ones, then `recordings`
    (name, samples: `--calibration-audio`). ONNX Runtime runs on `provider`; the reference is
    the eager fp32 LALM on the CPU."""
    tolerance = gate_tolerance(encoder_precision, "encoder", min_cosine, greedy_precisions=[decoder_precision])
    decoder_tolerance = gate_tolerance(decoder_precision, "decoder")  # NaN or inf logits fail whatever the bound
    report = ParityReport(tolerance, reference="eager PyTorch fp32 LALM (merged)")
    facts = {key: merged.config[key] for key in ("audio_token", "audio_token_id", "prompt")}
    runner = LalmRunner.from_parts(
        folder, merged.feature_config, merged.graph.spec.input_kind, {**facts, "context_length": merged.decoder.config.max_position_embeddings}, provider
    )
    options = GenerationOptions(max_new_tokens=GATE_TOKENS, stop_at_eos=False)
    agree: list[np.ndarray] = []
    first: int | None = None
    cases = [(f"speech-like clip, {seconds:.1f} s", clip) for seconds, clip in zip(GATE_CLIPS_S, gate_clips(seed))]
    cases += [(f"recording {name}, {len(clip) / 16_000:.1f} s", clip) for name, clip in recordings]
    for label, clip in cases:
        reference, candidate = eager_features(merged, clip), runner.audio_features(clip)
        report.record("audio_features", reference, candidate)
        embeds = eager_prompt(merged, reference)
        report.record("decoder logits (prefill)", *prefill_logits(merged, runner, embeds), tolerance=decoder_tolerance)
        expected = eager_tokens(merged, embeds, options)
        ours = runner.tokens_for(candidate, merged.config["prompt"], options)
        same = expected == ours[: len(expected)] if len(ours) >= len(expected) else np.zeros(len(expected), dtype=bool)
        agree.append(same)
        if first is None and not same.all():
            first = int(np.argmin(same))
        report.cases.append(f"{label}, {GATE_TOKENS} greedy tokens")
    steps = np.concatenate(agree)
    report.greedy = {"steps": int(steps.size), "agreement": float(steps.mean()), "first_divergence": first}
    return report
