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
  the architectures it covers on the CPU; the op-by-op graph in Optimum's layout, fed
  `inputs_embeds` (`lalm_export/graphs/traced.py`), for the others and for CUDA.
The skeleton (`pipeline.py`) runs the stages; the gate (`lalm_export/parity/lalm.py`)
compares the audio features with the eager encoder + projector, then the greedy tokens of the
whole pipeline with the eager LALM's."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lalm_export.errors import OptionsError
from lalm_export.export.component import Loaded, describe_base, fused_attention, gptq_model, last_position_logits_only, load_base, merge_into_base
from lalm_export.export.manifest import Built, BundleKind, build_manifest, decoder_facts
from lalm_export.export.options import DEFAULT_OPSET, ExportOptions, LalmExportOptions, check_min_cosine, check_output, check_target_cpu, require_cuda
from lalm_export.export.pipeline import STAGES, GraphPart, RunSettings, run_export
from lalm_export.graphs.fused import FUSED_OPTIMIZATIONS, build_fused_decoder, choose_decoder_graph
from lalm_export.graphs.traced import export_decoder as export_traced_decoder
from lalm_export.graphs.traced import export_module
from lalm_export.io import load_hf_model, sha256_tree
from lalm_export.models.adapters import ADAPTER_CONFIG, QuantizationSettings, load_full_weights
from lalm_export.models.families import get_family
from lalm_export.models.lalm import build_projector, encoder_feature_config_for, load_projector_weights, read_lalm_config, resize_for_tokenizer
from lalm_export.models.lalm_graph import AudioEncoderGraph, MergedLalm
from lalm_export.models.loading import refuse_missing_weights, require_bitsandbytes
from lalm_export.models.merge import dequantize_4bit_linears, merge_adapter_into, read_lora_pairs
from lalm_export.models.pretrained import PretrainedLalm, check_needs, pretrained_row
from lalm_export.parity.bounds import cosine_bound
from lalm_export.parity.lalm import GATE_CLIPS_S, check_lalm, eager_features, encoder_feeds, gate_clips
from lalm_export.parity.recordings import Recordings, read_recordings
from lalm_export.parity.signals import speech_like
from lalm_export.precision.mixed_int8 import Calibration
from lalm_export.precision.specs import SPECS, check_precision
from lalm_export.progress import Stages
from runtime.chat import CHAT_TEMPLATE
from runtime.limits import frame_samples, receptive_field
from runtime.manifest import Manifest, Source, denied, path_state, sha256_of

ENCODER_GRAPH, DECODER_GRAPH, TOKEN_TABLE = "audio_encoder.onnx", "decoder.onnx", "embed_tokens.npy"
RECORDING_SECONDS = 30.0  # of a --calibration-audio recording fed to an encoder of any length
PARTS = ("encoder", "decoder")


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
    """The load and merge stages of an LALM export: both parts as `--encoder`/`--decoder` would
    merge them, the decoder's vocabulary grown by the audio token, and the projector."""
    from transformers import AutoTokenizer

    folder = Path(opts.lalm).expanduser()
    row = pretrained_row(folder)
    if row is not None:
        return load_pretrained_lalm(folder, row, stages, opts)
    if opts.adapter is not None or opts.qlora:
        flag = "--qlora" if opts.qlora else "--adapter"
        raise OptionsError(
            f"{folder} is an LALM folder, which records each part's adapter (and 4-bit base) itself; {flag} with --lalm is for a Hugging Face checkpoint's whole-model LoRA"
        )
    config = read_lalm_config(folder)  # once: every part below takes it from here
    options = {part: component_options(folder, part, config, opts.trust_remote_code) for part in PARTS}
    # A fine-tuned decoder's weights hold the audio token's rows: load them once the base has them.
    decoder_weights = options["decoder"].weights
    options["decoder"] = dataclasses.replace(options["decoder"], weights=None)
    with stages.stage("load", ", ".join(f"{part} {describe_base(o, None)}" for part, o in options.items())):
        loaded: dict[str, Loaded] = {part: load_base(o) for part, o in options.items()}
        tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    with stages.stage("merge"):
        parts = {part: merge_into_base(loaded[part], options[part], stages.say, label=part) for part in PARTS}
        decoder = parts["decoder"].model
        resize_for_tokenizer(decoder, len(tokenizer))
        if decoder_weights is not None:
            load_full_weights(decoder, decoder_weights, "llm")
            source = dataclasses.replace(
                parts["decoder"].source, weights=str(decoder_weights.resolve()), weights_sha256=sha256_tree(decoder_weights), merge="full-weights"
            )
            parts["decoder"] = dataclasses.replace(parts["decoder"], source=source)
        encoder = parts["encoder"].model
        sizes = int(encoder.config.hidden_size), int(encoder.config.num_hidden_layers), int(decoder.config.hidden_size)
        projector = build_projector(config["projector"], *sizes, opts.trust_remote_code)
        load_projector_weights(projector, folder)
    spec = get_family(config["encoder"]["family"])
    graph = AudioEncoderGraph(encoder, projector.eval(), spec).eval()
    feature_config = encoder_feature_config_for(config["encoder"]["base_model"], spec, encoder.config)
    components = {part: {**dataclasses.asdict(merged.source), **merged.notes} for part, merged in parts.items()}
    return MergedLalm(graph, decoder.eval(), tokenizer, config, feature_config, components)


def load_pretrained_lalm(folder: Path, row: PretrainedLalm, stages: Stages, opts: LalmExportOptions) -> MergedLalm:
    """The load and merge stages for a Hugging Face checkpoint of a supported audio LLM: the
    LoRA adapter the checkpoint carries (as Granite Speech's do), then a whole-model LoRA
    (`--adapter`) merged, then its audio tower and projector taken apart from its language
    model by the architecture's row; the placeholder, its id and the prompt from the
    checkpoint's config and processor."""
    from transformers import AutoProcessor

    if not any((folder / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
        raise OptionsError(
            f"{folder} holds no processor (processor_config.json or preprocessor_config.json), which gives the audio front end and the "
            "prompt format: save the checkpoint's processor beside it (processor.save_pretrained)"
        )
    check_needs(row, folder)
    own_adapter = folder if (folder / ADAPTER_CONFIG).is_file() else None
    quantization = opts.quantization
    base = f" (4-bit {quantization.quant_type} base, as the adapter was trained)" if quantization else ""
    with stages.stage("load", f"{row.model_class} from {folder}{base}"):
        model = load_checkpoint(folder, row, opts.trust_remote_code, quantization, leave_out_adapter=own_adapter is not None)
        processor = load_hf_model(AutoProcessor, str(folder), trust_remote_code=opts.trust_remote_code)
        feature_config = (getattr(processor, "feature_extractor", None) or processor.audio_processor).to_dict()  # Granite's is its audio_processor
    record: dict[str, Any] = {"model": str(folder.resolve()), "model_type": row.model_type, "merge": "none"}
    # (manifest key, merge label, folder, what the progress line calls it), in merge order
    adapters = [
        (key, label, path, said)
        for key, label, path, said in (("checkpoint_adapter", "checkpoint-lora", own_adapter, "the checkpoint's own"), ("adapter", "lora", opts.adapter, None))
        if path is not None
    ]
    detail = " then ".join(f"LoRA from {said or path}" for _, _, path, said in adapters) or "no adapter: the checkpoint as it is"
    with stages.stage("merge", detail):
        if quantization is not None:
            stages.say(f"      dequantized {dequantize_4bit_linears(model)} 4-bit Linear layers to fp32")
            record["base"] = f"4-bit {quantization.quant_type}, dequantized"
        for key, _, path, said in adapters:
            pairs = read_lora_pairs(path, model)
            merge_adapter_into(model, pairs)
            stages.say(f"      merged LoRA into {len(pairs)} Linear layers ({said or path})")
            record.update({key: str(Path(path).resolve()), f"{key}_sha256": sha256_tree(path)})
        labels = [("qlora-dequantized" if quantization and key == "adapter" else label) for key, label, _, _ in adapters]
        record["merge"] = " + ".join(labels) or "none"
        graph, decoder = row.split(model.eval(), row.spec, feature_config)
    token, token_id = row.audio_token(model.config, processor)
    text = row.text(processor, token)
    config = {"audio_token": token, "audio_token_id": token_id, "prompt": text.prompt, "projector": {}}
    if text.chat_template is not None:  # the bundle formats chat requests with it (runtime.chat)
        text.tokenizer.chat_template = text.chat_template
        config.update(chat_template=CHAT_TEMPLATE, chat_content=text.chat_content)
    return MergedLalm(graph, decoder, text.tokenizer, config, feature_config, {"checkpoint": record})


def load_checkpoint(
    folder: Path, row: PretrainedLalm, trust_remote_code: bool, quantization: QuantizationSettings | None = None, leave_out_adapter: bool = False
) -> torch.nn.Module:
    """The checkpoint's model in fp32 (on the 4-bit base `quantization` describes), without the
    LoRA adapter it carries where `leave_out_adapter`: transformers would wrap its layers in
    peft's, which the merge reads from the adapter's files instead. Such a folder is loaded
    through a view of links that leaves the adapter's files out."""
    import transformers

    kwargs = {"trust_remote_code": trust_remote_code, "dtype": torch.float32, "output_loading_info": True}
    if quantization is not None:
        require_bitsandbytes()
        kwargs |= {"quantization_config": quantization.bnb_config(), "dtype": getattr(torch, quantization.base_dtype)}
    with tempfile.TemporaryDirectory(prefix="lalm-export-checkpoint-") as scratch:
        source = folder
        if leave_out_adapter:
            source = Path(scratch)
            for entry in folder.iterdir():
                if not entry.name.startswith("adapter_"):
                    (source / entry.name).symlink_to(entry.resolve())
        model, info = load_hf_model(getattr(transformers, row.model_class), str(source), **kwargs)
    refuse_missing_weights(info, str(folder), row.model_type)
    return model


def export_audio_encoder(graph: AudioEncoderGraph, feature_config: dict[str, Any], target: Path) -> None:
    from runtime.audio import features_for

    clip = speech_like(GATE_CLIPS_S[0])  # the tracing clip; the gate checks other lengths
    features = torch.from_numpy(features_for(graph.spec.input_kind, clip, feature_config)[None].astype(np.float32))
    lengths = torch.tensor([len(clip)], dtype=torch.int64)
    axes = {graph.spec.input_name: {0: "batch"} if not graph.spec.dynamic_length else {0: "batch", 1: "samples"}}
    axes |= {"audio_lengths": {0: "batch"}, "audio_features": {0: "batch", 1: "frames"}, "audio_feature_lengths": {0: "batch"}}
    inputs, outputs = [graph.spec.input_name, "audio_lengths"], ["audio_features", "audio_feature_lengths"]
    export_module(graph, (features, lengths), target, inputs, outputs, axes, DEFAULT_OPSET)


def export_decoder(merged: MergedLalm, graph_kind: str, folder: Path, trust_remote_code: bool) -> list[str]:
    """Write `folder/decoder.onnx`, the fp32 decoder on `inputs_embeds`; returns its optimizations."""
    if graph_kind == "fused":
        build_fused_decoder(merged.decoder, merged.tokenizer, folder, trust_remote_code, exclude_embeds=True, filename=DECODER_GRAPH)
        return list(FUSED_OPTIMIZATIONS)
    return last_position_logits_only(export_traced_decoder(merged.decoder, folder / DECODER_GRAPH, DEFAULT_OPSET, embeds=True))


@dataclass
class LalmSteps:
    """The LALM's part of the skeleton: the audio encoder + projector and the decoder on
    `inputs_embeds`, each in its own precision, with the token table beside them."""

    opts: LalmExportOptions
    merged: MergedLalm
    graph_kind: str
    exporter: str
    stages: Stages
    recordings: Recordings | None = None  # --calibration-audio
    int4_weights: dict[str, Any] = dataclasses.field(default_factory=lambda: {"method": "rtn"})

    @property
    def clips(self) -> list[np.ndarray]:
        """The clips the int8 search fits and meets its bound on: the gate's own, then the recordings."""
        return gate_clips(self.opts.seed) + [clip for _, clip in (self.recordings.clips if self.recordings else ())]

    @property
    def parts(self) -> tuple[GraphPart, ...]:
        encoder = GraphPart(ENCODER_GRAPH, "encoder", self.opts.encoder_precision, self.int8_calibration())
        return (encoder, GraphPart(DECODER_GRAPH, "decoder", self.opts.decoder_precision))

    def int8_calibration(self) -> Calibration | None:
        """An int8 audio encoder is made to meet the gate's audio-feature bound on the gate's
        clips (its own and the --calibration-audio recordings), over the frames the gate reads
        (mixed_int8.py), as a component encoder is."""
        if self.opts.encoder_precision != "int8":
            return None
        merged, clips = self.merged, self.clips
        bound = cosine_bound("int8", "encoder", self.opts.min_cosine)
        feeds = lambda: [encoder_feeds(merged, clip) for clip in clips]  # noqa: E731 - made when needed
        frames = functools.cache(lambda: [len(eager_features(merged, clip)) for clip in clips])  # measured once, read per search step
        return Calibration(feeds, bound.cosine, bound.row_cosine, frames)

    @property
    def precision_detail(self) -> str:
        int4 = f" ({self.opts.int4.method}, {self.opts.int4.describe()})" if self.opts.decoder_precision == "int4" else ""
        return f"audio encoder {self.opts.encoder_precision}, decoder {self.opts.decoder_precision}{int4}"

    @property
    def verify_detail(self) -> str:
        return f"ONNX Runtime ({self.opts.device}) vs eager fp32: audio features, then greedy tokens end to end"

    def export_graphs(self, fp32: Path, bundle: Path) -> list[str]:
        merged = self.merged
        export_audio_encoder(merged.graph, merged.feature_config, fp32 / ENCODER_GRAPH)
        encoder_rewrites = fused_attention(fp32 / ENCODER_GRAPH, self.opts.device, self.opts.encoder_precision)
        exported = merged
        if self.opts.int4.method == "gptq":  # the gate still compares with the merged fp32 decoder
            decoder, self.int4_weights = gptq_model(merged.decoder, merged.tokenizer, self.opts.int4, self.opts.seed, self.stages)
            exported = dataclasses.replace(merged, decoder=decoder)
        optimizations = export_decoder(exported, self.graph_kind, fp32, self.opts.trust_remote_code)
        np.save(bundle / TOKEN_TABLE, token_table(merged.decoder), allow_pickle=False)
        merged.tokenizer.save_pretrained(str(bundle))
        dump_feature_config(merged.feature_config, bundle / "preprocessor_config.json")
        return encoder_rewrites + optimizations

    def verify(self, bundle: Path, stages: Stages) -> dict[str, Any]:
        opts = self.opts
        recordings = self.recordings.clips if self.recordings else ()
        report = check_lalm(self.merged, bundle, opts.encoder_precision, opts.decoder_precision, opts.seed, opts.device, opts.min_cosine, recordings)
        return report.gate(stages.say)

    def manifest(self, bundle: Path, built: Built) -> Manifest:
        opts, spec = self.opts, self.merged.graph.spec
        encoder_type, decoder_type = self.merged.graph.encoder.config.model_type, self.merged.decoder.config.model_type
        precision = opts.decoder_precision if opts.encoder_precision == opts.decoder_precision else "mixed"
        kind = BundleKind(spec.name, "lalm", f"{encoder_type}+{decoder_type}", spec.input_kind, SPECS[opts.decoder_precision].weights, precision)
        source = Source(model=str(Path(opts.lalm).resolve()), adapter=None, adapter_sha256=sha256_tree(opts.lalm), merge="lalm")
        graphs = {"audio_encoder": ENCODER_GRAPH, "decoder": DECODER_GRAPH}
        extra = lalm_facts(self.merged, opts, bundle, self.graph_kind)
        if self.recordings:
            extra["calibration_audio"] = self.recordings.record()
        if opts.decoder_precision == "int4":
            extra["int4"] = {**self.int4_weights, "block_size": opts.int4.block_size, "lm_head": built.transforms[DECODER_GRAPH]["lm_head"]}
        return build_manifest(bundle, graphs, kind, source, built, extra, opts.device)


def export_lalm_bundle(opts: LalmExportOptions, quiet: bool = False) -> Manifest:
    """Export the LALM in `opts.lalm` to one bundle at `opts.output`; raises a `LalmExportError` on any user error."""
    validate_lalm_options(opts)
    recordings = read_recordings(opts.calibration_audio) if opts.calibration_audio is not None else None  # refused before the model loads
    stages = Stages(STAGES, quiet=quiet)
    torch.manual_seed(opts.seed)
    merged = load_merged_lalm(opts, stages)
    recordings = recordings.cut(window_seconds(merged)) if recordings else None
    graph_kind, why = choose_decoder_graph(opts.decoder_graph, merged.decoder, optimize=True, device=opts.device)
    builder = "ONNX Runtime's model builder" if graph_kind == "fused" else "torch.onnx, op by op"
    exporter = f"audio encoder + projector (torch.onnx), decoder on inputs_embeds ({builder}: {why})"
    settings = RunSettings(Path(opts.output), Path(opts.output).is_dir(), opts.verify, opts.target_cpu, opts.int4)
    return run_export(LalmSteps(opts, merged, graph_kind, exporter, stages, recordings), settings, stages)


def window_seconds(merged: MergedLalm) -> float:
    """The longest stretch of a recording the gate feeds the encoder at once: a Whisper-style
    encoder's window; for encoders of any length, `RECORDING_SECONDS`."""
    return float(merged.feature_config.get("chunk_length") or RECORDING_SECONDS) if merged.graph.spec.input_kind == "log_mel" else RECORDING_SECONDS


def token_table(decoder: torch.nn.Module) -> np.ndarray:
    """Every token's row as the decoder's embedding module computes it (not its raw weight: a
    module may scale its rows, as Gemma's does on transformers 5)."""
    embedding = decoder.get_input_embeddings()
    with torch.no_grad():
        return embedding(torch.arange(embedding.num_embeddings)).float().numpy()


def dump_feature_config(config: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps({k: v for k, v in config.items() if k != "mel_filters"}, indent=2, default=str) + "\n", encoding="utf-8")


def lalm_facts(merged: MergedLalm, opts: LalmExportOptions, folder: Path, graph_kind: str) -> dict[str, Any]:
    """What the runtime needs of an LALM bundle beyond its graphs (the manifest's `extra`)."""
    spec, config, decoder = merged.graph.spec, merged.config, merged.decoder
    return {
        "components": merged.components,
        "encoder": {"family": spec.name, "sampling_rate": 16_000, **encoder_facts(merged.graph.encoder.config, spec.input_kind, merged.feature_config)},
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
        "split": opts.split,  # runtime.longform: how a recording longer than the window is cut
        **({"chat_template": config["chat_template"], "chat_content": config["chat_content"]} if "chat_template" in config else {}),
        **({"downsample": int(config["projector"]["downsample"])} if "downsample" in config["projector"] else {}),
        **decoder_facts(decoder, merged.tokenizer),
        "decoder_graph": f"{graph_kind} (inputs_embeds)",
        "precision": {"audio_encoder": opts.encoder_precision, "decoder": opts.decoder_precision},
    }


def encoder_facts(config: Any, input_kind: str, feature_config: dict[str, Any]) -> dict[str, int]:
    """The audio encoder's sizes that runtime.limits bounds a clip by: its shortest input, and
    for encoders of any length its heads, width and input samples per frame (a conformer's
    config names them `num_heads` and `hidden_dim`)."""
    facts = {
        "hidden_size": int(getattr(config, "hidden_size", None) or config.hidden_dim),
        "num_attention_heads": int(getattr(config, "num_attention_heads", None) or config.num_heads),
        "receptive_field_samples": receptive_field(config.to_dict()),
    }
    if input_kind == "raw_audio":
        facts["frame_samples"] = frame_samples(config.to_dict())
    if input_kind == "stacked_log_mel":  # two mel frames per encoder frame; the centred FFT needs more than half a window
        mel = feature_config.get("melspec_kwargs", {})
        facts |= {"frame_samples": 2 * int(mel.get("hop_length", 160)), "receptive_field_samples": int(mel.get("n_fft", 512)) // 2 + 1}
    return facts


def validate_lalm_options(opts: LalmExportOptions) -> None:
    folder = Path(opts.lalm).expanduser()
    state = path_state(folder)
    if state == "denied" or (state == "folder" and not os.access(folder, os.R_OK | os.X_OK)):
        raise OptionsError(denied("--lalm", folder))
    if state == "file":
        raise OptionsError(f"--lalm {folder} is a file; pass the folder written by LALM.save_pretrained()")
    if state == "missing":
        raise OptionsError(f"--lalm {folder} does not exist; pass the folder written by LALM.save_pretrained()")
    if opts.qlora and opts.adapter is None:
        raise OptionsError("--qlora describes the 4-bit base an adapter was trained on: pass --adapter too")
    check_precision(opts.encoder_precision, "encoder", opts.device)
    check_precision(opts.decoder_precision, "decoder", opts.device)
    check_target_cpu(opts.target_cpu, (opts.encoder_precision, opts.decoder_precision))
    opts.int4.validate(opts.decoder_precision)
    check_min_cosine(
        opts.min_cosine,
        opts.encoder_precision,
        "--min-cosine with --lalm is a bound in (0, 1] on the audio features of a reduced-precision audio encoder: "
        "pass --encoder-precision int8 (or fp16 with --device cuda)",
    )
    check_output(Path(opts.output), opts.force)
    if opts.device == "cuda":
        require_cuda()
