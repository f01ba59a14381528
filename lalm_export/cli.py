"""`lalm-export`: parse flags into `ExportOptions` and call `export_bundle`."""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

from lalm_export.errors import OptionsError
from lalm_export.export.options import DEFAULT_OPSET, TARGET_CPUS, ExportOptions, LalmExportOptions
from lalm_export.graphs.fused import GRAPH_CHOICES
from lalm_export.models.families import ENCODER_FAMILIES
from lalm_export.parity.bounds import FP32_RELATIVE
from lalm_export.precision.int4 import INT4_BLOCK_SIZE, INT4_BLOCK_SIZES, INT4_LM_HEAD, INT4_LM_HEADS, INT4_METHODS, Int4Options
from lalm_export.precision.specs import DEVICES, PRECISIONS, SPECS
from runtime.cpu import int8_kernels

EPILOG = """examples:
  # a Wav2Vec2 encoder with a LoRA adapter saved by Wav2Vec2AudioEncoder.save_lora_weights()
  lalm-export --encoder wav2vec2 --model ./wav2vec2-base --adapter ./ckpt --output ./bundles/w2v2

  # a QLoRA adapter from plain peft: merged into the dequantized NF4 base it was trained on
  lalm-export --decoder auto --model ./qwen2.5-0.5b --adapter ./peft-adapter --qlora --output ./bundles/llm

  # int8 for CPU serving, gated on cosine against eager fp32; made for this machine's int8 kernels,
  # or for another CPU's (an AVX2-only server: 7-bit weights, which its kernels cannot saturate)
  lalm-export --encoder hubert --model ./hubert-base --precision int8 --output ./bundles/hubert-int8
  lalm-export --encoder hubert --model ./hubert-base --precision int8 --target-cpu avx2 --output ./bundles/hubert-int8-avx2

  # int4 weight-only decoder (a fused-attention graph on the CPU); fp16 verified on a GPU
  lalm-export --decoder auto --model ./qwen2.5-0.5b --precision int4 --output ./bundles/llm-int4
  lalm-export --decoder auto --model ./qwen2.5-0.5b --precision int4 --int4-method gptq --output ./bundles/llm-gptq
  lalm-export --decoder auto --model ./qwen2.5-0.5b --precision int4 --int4-method gptq --calibration ./calib.txt --output ./bundles/llm-gptq-text
  lalm-export --encoder whisper --model ./whisper-base --precision fp16 --device cuda --output ./bundles/whisper-fp16

  # an audio LLM saved by LALM.save_pretrained(): one bundle, int8 audio encoder and int4 decoder
  lalm-export --lalm ./my-lalm --encoder-precision int8 --decoder-precision int4 --output ./bundles/lalm
  # the same with GPTQ's int4 weights, calibrated on text like the decoder's outputs
  lalm-export --lalm ./my-lalm --encoder-precision int8 --decoder-precision int4 --int4-method gptq --calibration ./transcripts.txt --output ./bundles/lalm-gptq
  # int8 both parts, the gate and the int8 encoder's calibration also on recordings like the ones it will hear
  lalm-export --lalm ./my-lalm --precision int8 --calibration-audio ./recordings --output ./bundles/lalm-int8
  # its decoder as the op-by-op graph (what architectures outside the fused graph's list, and CUDA, get)
  lalm-export --lalm ./my-lalm --decoder-graph optimum --output ./bundles/lalm-optimum
  lalm-export --lalm ./Qwen2-Audio-7B-Instruct --adapter ./qlora-adapter --qlora --output ./bundles/qwen2-audio

  # every layer's hidden states, printing the manifest as JSON
  lalm-export --encoder whisper --model ./whisper-small --all-hidden-states --output ./bundles/whisper --json

exit status: 0 exported and verified; 1 user error (message on stderr, nothing written); 2 bad flags."""


def finite_float(text: str) -> float:
    """argparse type: a number, refusing NaN and infinity (they would pass or fail every bound)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lalm-export",
        description="Merge an adapter into an audio encoder or LLM decoder, export it to ONNX, "
        "verify ONNX Runtime against the eager model, and write a self-describing bundle.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--encoder", choices=ENCODER_FAMILIES, help="audio-encoder family to export")
    what.add_argument(
        "--decoder", metavar="ARCH", help="export a causal LM; ARCH is its model type (llama, qwen2, mistral, ...) or auto (read from the checkpoint)"
    )
    what.add_argument(
        "--lalm",
        type=Path,
        metavar="DIR",
        help="export an audio LLM saved by LALM.save_pretrained(), or a Hugging Face checkpoint of Qwen2-Audio, Voxtral or Granite Speech, as one bundle: audio "
        "encoder + projector, token table, decoder on embeddings (its adapters merged; --precision, --encoder-precision, --decoder-precision, "
        "--decoder-graph and --device apply; docs/pretrained-lalms.md)",
    )
    parser.add_argument("--output", "-o", required=True, type=Path, help="bundle folder to write (refused if it exists and is not empty, unless --force)")
    parser.add_argument("--model", help="local checkpoint folder or hub id (default: the family's usual public checkpoint)")
    parser.add_argument(
        "--adapter",
        type=Path,
        help="LoRA adapter folder: from save_lora_weights() or plain peft (adapter_config.json + adapter_model.safetensors); with --lalm, "
        "a peft LoRA trained on the whole Hugging Face checkpoint (language model and/or audio tower)",
    )
    parser.add_argument(
        "--qlora",
        action="store_true",
        help="the (plain peft) adapter was trained on a 4-bit base (with --lalm: the whole checkpoint loaded in 4 bits): merge into that base, dequantized",
    )
    parser.add_argument("--bnb-quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit type of that base, with --qlora (default: nf4)")
    parser.add_argument("--no-double-quant", dest="bnb_double_quant", action="store_false", help="that base did not use double quantization, with --qlora")
    parser.add_argument("--weights", type=Path, help="full weights folder from save_model_weights() (a fine-tuned encoder or decoder)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (exact); int8: dynamic int8 MatMuls, for CPUs (see --target-cpu); int4: weight-only, decoders; fp16: for CUDA; "
        "bf16 is refused (ONNX Runtime has no CPU kernel for it). Non-fp32 graphs are gated on cosine vs eager fp32 (default: fp32)",
    )
    for role, suits in (("encoder", "int8 on CPUs"), ("decoder", "int8 or int4 on CPUs")):
        parser.add_argument(
            f"--{role}-precision",
            choices=PRECISIONS,
            help=f"with --lalm: the {role} part's precision ({suits}; default: --precision where it suits the {role}, else fp32)",
        )
    parser.add_argument(
        "--split",
        choices=("vad", "energy", "fixed"),
        help="--lalm: how the runtime cuts recordings longer than the window, recorded in the manifest (extra.split) as the "
        "bundle's default: vad (Silero VAD, at pauses in speech), energy (at quiet stretches: tones, music), fixed (overlapping "
        "windows) (default: vad)",
    )
    parser.add_argument(
        "--min-cosine",
        type=finite_float,
        help="parity bound of a reduced precision: cosine, whole and per frame/position, against eager fp32 "
        "(default: 0.999 for encoders, 0.99 for decoders, 0.8 for int4 decoders; see lalm_export/parity/bounds.py)",
    )
    parser.add_argument(
        "--target-cpu",
        choices=TARGET_CPUS,
        default="auto",
        help="int8: the int8 kernels the graph is made for. avx2 (no VNNI: AVX2, or AVX-512 without VNNI) saturates "
        "u8 x s8 sums at int16, so its graphs get 7-bit weights (a scale per output channel); avx-vnni, avx512-vnni and amx sum in int32 and get 8-bit "
        "weights. The gate runs on this machine's kernels; the manifest records both, and the runtime warns on other kernels "
        f"(default: auto, this machine's: {int8_kernels()})",
    )
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="where the parity gate runs: eager model and ONNX Runtime provider (default: cpu)")
    parser.add_argument(
        "--optimize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="graph rewrites with the same math that make it faster: decoder graphs compute logits for the last position only; "
        "encoder graphs for the CPU (fp32, int8) get their unmasked self-attention fused into ONNX Runtime's MultiHeadAttention "
        "(default: on; ONNX Runtime's own fusions run when the runtime loads the graph)",
    )
    parser.add_argument(
        "--decoder-graph",
        choices=GRAPH_CHOICES,
        default="auto",
        help="decoders: fused = ONNX Runtime's model builder (GroupQueryAttention with rotary inside, fused norms; "
        "Llama, Mistral, Qwen2, Qwen3; CPU), optimum = the op-by-op graph in Optimum's layout (torch.onnx); auto = fused where it applies and "
        "--optimize is on, else optimum (default: auto)",
    )
    parser.add_argument(
        "--int4-method",
        choices=INT4_METHODS,
        default="rtn",
        help="int4 weights: rtn = round to nearest; gptq = error-compensating (GPTQ): each layer's rounding error spread over "
        "the weights not yet rounded, calibrated on --calibration text or, without it, on text the model samples itself (default: rtn)",
    )
    parser.add_argument(
        "--int4-block-size",
        type=int,
        choices=INT4_BLOCK_SIZES,
        default=INT4_BLOCK_SIZE,
        help=f"weights per int4 scale: larger blocks read fewer scales per token (faster decode) and round coarser (default: {INT4_BLOCK_SIZE})",
    )
    parser.add_argument(
        "--int4-lm-head",
        choices=INT4_LM_HEADS,
        default=INT4_LM_HEAD,
        help="the lm_head of an int4 decoder: int8 = 8-bit blocks, the layer whose rounding flips the most next tokens; "
        f"int4 = like the other layers, fewer bytes per token (default: {INT4_LM_HEAD})",
    )
    parser.add_argument(
        "--calibration",
        dest="int4_calibration",
        type=Path,
        metavar="FILE",
        help="UTF-8 text like the model's inputs, for --int4-method gptq (a few pages or more; default: the model's own samples)",
    )
    parser.add_argument(
        "--calibration-audio",
        type=Path,
        metavar="PATH",
        help="with --lalm: a recording, or a folder of them (wav, flac, ogg, mp3; the first 8), like the audio the bundle will hear: "
        "the parity gate judges them beside its synthetic clips, and an int8 audio encoder is calibrated on them too (recorded in the manifest)",
    )
    parser.add_argument("--all-hidden-states", action="store_true", help="also export every layer's hidden states (hidden_states.0 ... N)")
    parser.add_argument("--force", action="store_true", help="replace an existing --output, once the new bundle is complete")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip the parity gate (the manifest records that it was skipped)")
    parser.add_argument(
        "--rtol", type=finite_float, default=FP32_RELATIVE, help=f"parity tolerance: max-abs / max|eager| per output (default: {FP32_RELATIVE:g})"
    )
    parser.add_argument("--atol", type=finite_float, help="also accept an output whose max-abs error is at most this")
    parser.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the checkpoint (off by default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random verification inputs and of GPTQ's self-calibration samples (default: 0)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors (and --json)")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON on stdout when done")
    return parser


# The flags an LALM export takes; the rest describe a single component (an LALM folder records its own).
LALM_FLAGS = (
    *("lalm", "output", "force", "verify", "seed", "trust_remote_code", "quiet", "json", "adapter", "qlora", "bnb_quant_type", "bnb_double_quant"),
    *("precision", "encoder_precision", "decoder_precision", "decoder_graph", "device", "target_cpu", "min_cosine", "split"),
    *("int4_method", "int4_block_size", "int4_lm_head", "int4_calibration", "calibration_audio"),
)


def component_precision(args: argparse.Namespace, role: str) -> str:
    """--ROLE-precision, else --precision where it suits the role (int4 is for decoders), else fp32."""
    chosen = getattr(args, f"{role}_precision")
    if chosen is not None:
        return chosen
    return args.precision if role in SPECS[args.precision].roles else "fp32"


def lalm_options_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> LalmExportOptions:
    defaults = vars(parser.parse_args(["--lalm", "x", "--output", "x"]))
    changed = [name for name, value in vars(args).items() if name not in LALM_FLAGS and value != defaults[name]]
    if changed:
        flag = next(a.option_strings[0] for a in parser._actions if a.dest == changed[0])
        parser.error(f"{flag} describes a single --encoder or --decoder export; an LALM folder records its components, adapters and settings")
    names = ("lalm", "output", "force", "verify", "seed", "trust_remote_code", "decoder_graph", "device", "target_cpu", "min_cosine", "adapter")
    names += ("qlora", "bnb_quant_type", "bnb_double_quant", "calibration_audio")
    if args.split is not None:
        names += ("split",)
    return LalmExportOptions(
        **{name: getattr(args, name) for name in names},
        encoder_precision=component_precision(args, "encoder"),
        decoder_precision=component_precision(args, "decoder"),
        int4=int4_options(args),
    )


def int4_options(args: argparse.Namespace) -> Int4Options:
    """The --int4-* flags (`int4_`-prefixed fields of the namespace)."""
    return Int4Options(**{name.removeprefix("int4_"): value for name, value in vars(args).items() if name.startswith("int4_")})


def options_from_args(args: argparse.Namespace) -> ExportOptions:
    """Flags are named after `ExportOptions` fields (int4's with an `int4_` prefix), so the
    options are read off the namespace; only the family and architecture are derived."""
    values = vars(args).copy()
    values.pop("lalm", None)
    per_part = [values.pop("encoder_precision"), values.pop("decoder_precision")]
    if any(precision is not None for precision in per_part):
        raise OptionsError("--encoder-precision and --decoder-precision choose an --lalm bundle's parts; for one component use --precision")
    if values.pop("calibration_audio") is not None:
        raise OptionsError("--calibration-audio gives an --lalm bundle's gate and int8 audio encoder recordings to hold on; pass --lalm DIR")
    if values.pop("split") is not None:
        raise OptionsError("--split records how an --lalm bundle cuts long recordings; an encoder bundle refuses audio longer than it encodes")
    values["family"] = values.pop("encoder") or "llm"
    values["decoder_arch"] = values.pop("decoder") or "auto"
    known = {f.name for f in fields(ExportOptions)} - {"int4"}
    return ExportOptions(int4=int4_options(args), **{name: value for name, value in values.items() if name in known})


def quiet_libraries() -> None:
    """Library chatter a user cannot act on (our own stages report progress)."""
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # a bar per checkpoint loaded and saved
    for name in ("bitsandbytes", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so the same cleanup runs."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While the export runs, SIGTERM (a scheduler's kill, `timeout`) unwinds like SIGINT:
    the partial bundle and any folders made for it are removed."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_libraries()
    from lalm_export.errors import LalmExportError
    from lalm_export.export.component import export_bundle
    from runtime.errors import RuntimeUserError
    from runtime.manifest import denied

    try:
        with terminate_as_interrupt():
            if args.lalm is not None:
                from lalm_export.export.lalm import export_lalm_bundle

                manifest = export_lalm_bundle(lalm_options_from_args(args, parser), quiet=args.quiet)
            else:
                manifest = export_bundle(options_from_args(args), quiet=args.quiet)
    except (LalmExportError, RuntimeUserError) as err:
        print(f"lalm-export: error: {err}", file=sys.stderr)
        return 1
    except PermissionError as err:  # any path this run reads or writes: the user's files, not a bug
        print(f"lalm-export: error: {denied('path', err.filename)}; no bundle was written", file=sys.stderr)
        return 1
    except Terminated:
        print("lalm-export: terminated; no bundle was written", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("lalm-export: interrupted; no bundle was written", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2))
    elif not args.quiet:
        print(
            f"bundle written to {args.output} ({manifest.precision}, "
            f"{'no adapter' if manifest.source.merge == 'none' else manifest.source.merge + ' merge'}, "
            f"parity {'passed' if manifest.parity.get('passed') else 'not verified'})",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
