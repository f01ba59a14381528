"""`lalm-export --lalm DIR`: an LALM saved with `LALM.save_pretrained` as one bundle.

Three parts, every adapter merged as for the single components (QLoRA into its dequantized
4-bit base):
- `audio_encoder.onnx`: the family's input and each clip's length in samples →
  `audio_features` (projected frames in the decoder's hidden size) and `audio_feature_lengths`
  (the frames that are the clip's own; the rest is padding);
- the embedding: the decoder's token table (`embed_tokens.npy`), looked up on the host, where
  the audio rows take the placeholder's place;
- `decoder.onnx`: the decoder without its embedding: `inputs_embeds`, `attention_mask` and
  the KV cache → logits. ONNX Runtime's model builder writes it fused (`exclude_embeds`) for
  the architectures it covers on the CPU; Optimum's graph, its first input renamed
  (`lalm_export.graphs.embeds`), for the others and for CUDA.
The parity gate compares the audio features with the eager encoder + projector, then the
greedy tokens of the whole pipeline with the eager LALM's."""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lalm_export.errors import OptionsError
from lalm_export.export.component import last_position_logits_only, load_merged_model
from lalm_export.export.manifest import graph_facts, int8_record, library_versions
from lalm_export.export.options import DEFAULT_OPSET, ExportOptions, LalmExportOptions, check_min_cosine, check_output, check_target_cpu, require_cuda
from lalm_export.graphs.embeds import export_embeds_decoder
from lalm_export.graphs.fused import FUSED_OPTIMIZATIONS, build_fused_decoder, choose_decoder_graph
from lalm_export.io import atomic_folder, read_safetensors, sha256_tree
from lalm_export.models.adapters import load_full_weights
from lalm_export.models.families import FamilySpec, get_family
from lalm_export.models.lalm import (
    PROJECTOR_WEIGHTS,
    AudioProjector,
    ProjectorConfig,
    encoder_feature_config_for,
    encoder_frames,
    read_lalm_config,
    resize_for_tokenizer,
)
from lalm_export.parity.signals import speech_like
from lalm_export.precision.specs import SPECS, TransformJob, apply_precision, check_precision
from lalm_export.progress import Stages
from runtime.limits import receptive_field
from runtime.manifest import Manifest, Source, sha256_of

STAGES = ["load", "merge", "export", "precision", "verify", "write"]
ENCODER_GRAPH, DECODER_GRAPH, TOKEN_TABLE = "audio_encoder.onnx", "decoder.onnx", "embed_tokens.npy"
GATE_TOKENS = 32
GATE_CLIPS_S = (1.0, 1.6)


class AudioEncoderGraph(nn.Module):
    """Encoder + projector as one module: the family's input and the clips' lengths in
    samples → projected frames and how many of them are each clip's own."""

    def __init__(self, encoder: nn.Module, projector: AudioProjector, spec: FamilySpec) -> None:
        super().__init__()
        self.encoder, self.projector, self.spec = encoder, projector, spec

    def forward(self, features: torch.Tensor, audio_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(**{self.spec.input_name: features}, output_hidden_states=True).hidden_states
        frames = encoder_frames(self.encoder.config, audio_lengths, self.spec.frame_samples)
        return self.projector(hidden), self.projector.frames(frames)


@dataclass
class MergedLalm:
    graph: AudioEncoderGraph
    decoder: nn.Module  # the merged causal LM, its vocabulary grown by the audio token
    tokenizer: Any
    config: dict[str, Any]
    feature_config: dict[str, Any]
    components: dict[str, dict[str, Any]]  # the manifest's record of each part: its source, merge and notes


def component_options(folder: Path, part: str, config: dict[str, Any], trust_remote_code: bool) -> ExportOptions:
    """The component as `--encoder`/`--decoder` would export it: its base, and its adapter or weights."""
    mode, saved = config[part]["mode"], folder / part
    adapter = saved if mode["use_lora"] or mode["use_qlora"] else None
    weights = saved if mode.get("finetune") and adapter is None else None
    return ExportOptions(
        family=config[part]["family"],
        output=folder / ".unused",
        model=config[part]["base_model"],
        adapter=adapter,
        weights=weights,
        trust_remote_code=trust_remote_code,
    )


def load_merged_lalm(opts: LalmExportOptions, stages: Stages) -> MergedLalm:
    from transformers import AutoTokenizer

    folder = Path(opts.lalm).expanduser()
    config = read_lalm_config(folder)
    options = {part: component_options(folder, part, config, opts.trust_remote_code) for part in ("encoder", "decoder")}
    # A fine-tuned decoder's weights hold the audio token's rows: load them once the base has them.
    decoder_weights = options["decoder"].weights
    options["decoder"] = dataclasses.replace(options["decoder"], weights=None)
    parts = {part: load_merged_model(part_options, stages) for part, part_options in options.items()}
    spec = get_family(config["encoder"]["family"])
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    decoder = parts["decoder"].model
    resize_for_tokenizer(decoder, len(tokenizer))
    if decoder_weights is not None:
        load_full_weights(decoder, decoder_weights, "llm")
        source = dataclasses.replace(
            parts["decoder"].source, weights=str(decoder_weights.resolve()), weights_sha256=sha256_tree(decoder_weights), merge="full-weights"
        )
        parts["decoder"] = dataclasses.replace(parts["decoder"], source=source)
    encoder = parts["encoder"].model
    projector = AudioProjector(
        int(encoder.config.hidden_size), int(encoder.config.num_hidden_layers), int(decoder.config.hidden_size), ProjectorConfig(**config["projector"])
    )
    projector.load_state_dict(read_safetensors(folder / PROJECTOR_WEIGHTS))
    graph = AudioEncoderGraph(encoder, projector.eval(), spec).eval()
    feature_config = encoder_feature_config_for(config["encoder"]["base_model"], spec, encoder.config)
    components = {part: {**dataclasses.asdict(merged.source), **merged.notes} for part, merged in parts.items()}
    return MergedLalm(graph, decoder.eval(), tokenizer, config, feature_config, components)


def export_audio_encoder(graph: AudioEncoderGraph, feature_config: dict[str, Any], target: Path) -> None:
    from runtime.audio import features_for

    clip = speech_like(GATE_CLIPS_S[0])
    features = torch.from_numpy(features_for(graph.spec.input_kind, clip, feature_config)[None].astype(np.float32))
    lengths = torch.tensor([len(clip)], dtype=torch.int64)
    axes = {graph.spec.input_name: {0: "batch"} if not graph.spec.dynamic_length else {0: "batch", 1: "samples"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python branches; the gate checks other lengths
        torch.onnx.export(
            graph,
            (features, lengths),
            str(target),
            input_names=[graph.spec.input_name, "audio_lengths"],
            output_names=["audio_features", "audio_feature_lengths"],
            dynamic_axes={**axes, "audio_lengths": {0: "batch"}, "audio_features": {0: "batch", 1: "frames"}, "audio_feature_lengths": {0: "batch"}},
            opset_version=DEFAULT_OPSET,
            dynamo=False,
        )


def export_lalm_bundle(opts: LalmExportOptions, quiet: bool = False) -> Manifest:
    """Export the LALM in `opts.lalm` to one bundle at `opts.output`; raises a `LalmExportError` on any user error."""
    validate_lalm_options(opts)
    stages = Stages(STAGES, quiet=quiet)
    torch.manual_seed(opts.seed)
    merged = load_merged_lalm(opts, stages)
    graph_kind, why = choose_decoder_graph(opts.decoder_graph, merged.decoder, optimize=True, device=opts.device)
    builder = "ONNX Runtime's model builder" if graph_kind == "fused" else "Optimum"
    with atomic_folder(opts.output, replace=Path(opts.output).is_dir()) as tmp:
        fp32 = tmp / "fp32"
        with stages.stage("export", f"audio encoder + projector (torch.onnx), decoder on inputs_embeds ({builder}: {why})"):
            fp32.mkdir()
            export_audio_encoder(merged.graph, merged.feature_config, fp32 / ENCODER_GRAPH)
            optimizations = export_decoder(merged, graph_kind, fp32, opts.trust_remote_code)
            table = merged.decoder.get_input_embeddings().weight.detach().float().numpy()
            np.save(tmp / TOKEN_TABLE, table, allow_pickle=False)
            merged.tokenizer.save_pretrained(str(tmp))
            dump_feature_config(merged.feature_config, tmp / "preprocessor_config.json")
        precisions = {ENCODER_GRAPH: (opts.encoder_precision, "encoder"), DECODER_GRAPH: (opts.decoder_precision, "decoder")}
        if all_fp32(opts):
            stages.skip("precision", "fp32")
        placing = nullcontext() if all_fp32(opts) else stages.stage("precision", f"audio encoder {opts.encoder_precision}, decoder {opts.decoder_precision}")
        with placing:
            recipes = {graph: place_graph(fp32, tmp, graph, precision, role, opts.target_cpu) for graph, (precision, role) in precisions.items()}
            shutil.rmtree(fp32)
        if opts.verify:
            with stages.stage("verify", f"ONNX Runtime ({opts.device}) vs eager fp32: audio features, then greedy tokens end to end"):
                from lalm_export.parity.lalm import check_lalm

                report = check_lalm(
                    merged, tmp, opts.encoder_precision, all_fp32=all_fp32(opts), seed=opts.seed, provider=opts.device, min_cosine=opts.min_cosine
                )
                for line in report.summary_lines():
                    stages.say(f"      {line}")
                report.raise_if_failed()
                parity = report.to_dict()
        else:
            stages.skip("verify", "--no-verify")
            parity = {"verified": False, "reason": "--no-verify"}
        with stages.stage("write", str(opts.output)):
            int8 = next((int8_record(facts, opts.verify) for graph, facts in recipes.items() if precisions[graph][0] == "int8"), None)
            manifest = lalm_manifest(merged, opts, tmp, parity, graph_kind, optimizations, int8)
            manifest.write(tmp)
    return manifest


def export_decoder(merged: MergedLalm, graph_kind: str, folder: Path, trust_remote_code: bool) -> list[str]:
    """Write `folder/decoder.onnx`, the fp32 decoder on `inputs_embeds`; returns its optimizations."""
    if graph_kind == "fused":
        build_fused_decoder(merged.decoder, merged.tokenizer, folder, trust_remote_code, exclude_embeds=True, filename=DECODER_GRAPH)
        return list(FUSED_OPTIMIZATIONS)
    return last_position_logits_only(export_embeds_decoder(merged.decoder, folder / DECODER_GRAPH, DEFAULT_OPSET))


def all_fp32(opts: LalmExportOptions) -> bool:
    return opts.encoder_precision == opts.decoder_precision == "fp32"


def place_graph(source: Path, target: Path, graph: str, precision: str, role: str, target_cpu: str) -> dict[str, object]:
    """The fp32 graph (and its weights file) moved into the bundle, or its `precision` transform
    written there; returns the transform's facts for the manifest."""
    if precision == "fp32":
        for file in source.glob(graph + "*"):
            file.rename(target / file.name)
        return {}
    return apply_precision(source / graph, target / graph, precision, TransformJob(role, target_cpu=target_cpu))


def dump_feature_config(config: dict[str, Any], path: Path) -> None:
    import json

    path.write_text(json.dumps({k: v for k, v in config.items() if k != "mel_filters"}, indent=2, default=str) + "\n", encoding="utf-8")


def lalm_manifest(
    merged: MergedLalm,
    opts: LalmExportOptions,
    folder: Path,
    parity: dict[str, Any],
    graph_kind: str,
    optimizations: list[str],
    int8: dict[str, Any] | None,
) -> Manifest:
    encoder_record, opset = graph_facts(folder, folder / ENCODER_GRAPH)
    decoder_record, _ = graph_facts(folder, folder / DECODER_GRAPH)
    spec = merged.graph.spec
    config, tokenizer, decoder = merged.config, merged.tokenizer, merged.decoder
    encoder_config = merged.graph.encoder.config
    return Manifest(
        family=spec.name,
        role="lalm",
        model_type=f"{encoder_config.model_type}+{decoder.config.model_type}",
        input_kind=spec.input_kind,
        graphs={"audio_encoder": encoder_record, "decoder": decoder_record},
        dtype=SPECS[opts.decoder_precision].weights,
        opset=opset,
        source=Source(model=str(Path(opts.lalm).resolve()), adapter=None, adapter_sha256=sha256_tree(opts.lalm), merge="lalm"),
        libraries=library_versions(),
        parity=parity,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        extra={
            "components": merged.components,
            "encoder": {
                "family": spec.name,
                "hidden_size": int(encoder_config.hidden_size),
                "sampling_rate": 16_000,
                "receptive_field_samples": receptive_field(encoder_config.to_dict()),
            },
            # the checkpoint's own window (a Whisper-style encoder may have a shorter one than 30 s)
            "chunk_seconds": merged.feature_config.get("chunk_length") if spec.input_kind == "log_mel" else None,
            "embedding": {
                "kind": "host table",
                "file": TOKEN_TABLE,
                "sha256": sha256_of(folder / TOKEN_TABLE),
                "shape": list(decoder.get_input_embeddings().weight.shape),
            },
            "audio_token": config["audio_token"],
            "audio_token_id": int(config["audio_token_id"]),
            "prompt": config["prompt"],
            "downsample": int(config["projector"]["downsample"]),
            "context_length": int(decoder.config.max_position_embeddings),
            "vocab_size": int(decoder.get_input_embeddings().num_embeddings),
            "hidden_size": int(decoder.config.hidden_size),
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "decoder_graph": f"{graph_kind} (inputs_embeds)",
            "precision": {"audio_encoder": opts.encoder_precision, "decoder": opts.decoder_precision},
            **({"int8": int8} if int8 is not None else {}),
        },
        precision=opts.decoder_precision if opts.encoder_precision == opts.decoder_precision else "mixed",
        optimizations=optimizations,
        device=opts.device,
    )


def validate_lalm_options(opts: LalmExportOptions) -> None:
    folder = Path(opts.lalm).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OptionsError(f"--lalm {folder} is a file; pass the folder written by LALM.save_pretrained()")
    if not folder.is_dir():
        raise OptionsError(f"--lalm {folder} does not exist; pass the folder written by LALM.save_pretrained()")
    read_lalm_config(folder)
    check_precision(opts.encoder_precision, "encoder", opts.device)
    check_precision(opts.decoder_precision, "decoder", opts.device)
    check_target_cpu(opts.target_cpu, (opts.encoder_precision, opts.decoder_precision))
    check_min_cosine(
        opts.min_cosine,
        opts.encoder_precision,
        "--min-cosine with --lalm is a bound in (0, 1] on the audio features of a reduced-precision audio encoder: "
        "pass --encoder-precision int8 (or fp16 with --device cuda)",
    )
    check_output(Path(opts.output), opts.force)
    if opts.device == "cuda":
        require_cuda()
