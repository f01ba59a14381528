"""The bundle format, defined once: `manifest.json` and how it is read and written.

A bundle is one folder: graph file(s), the model config, the feature-extractor or
tokenizer files, and this manifest. The exporter writes it through this module and the
runtime reads it through this module."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from runtime.errors import BundleError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MERGE_KINDS = ("none", "lora", "qlora-dequantized", "full-weights", "lalm")  # lalm: each component as extra.components says
ROLES = ("encoder", "decoder", "lalm")
# The graphs each role's bundle holds (an LALM: encoder + projector, and a decoder on embeddings).
ROLE_GRAPHS = {"encoder": ("model",), "decoder": ("model",), "lalm": ("audio_encoder", "decoder")}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class GraphFile:
    """One ONNX graph: its file(s) relative to the bundle, their sha256, and its I/O."""

    path: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    data_files: dict[str, str] = field(default_factory=dict)  # external-data file -> sha256


@dataclass(frozen=True)
class Source:
    model: str
    adapter: str | None = None
    adapter_sha256: str | None = None
    weights: str | None = None
    weights_sha256: str | None = None
    merge: str = "none"


@dataclass(frozen=True)
class Manifest:
    family: str
    role: str
    model_type: str
    input_kind: str
    graphs: dict[str, GraphFile]
    dtype: str
    opset: int
    source: Source
    libraries: dict[str, str]
    parity: dict[str, Any]
    created: str
    extra: dict[str, Any] = field(default_factory=dict)  # family facts the runtime needs (ids, sizes)
    precision: str = "fp32"  # fp32, fp16, int8 or int4: what `lalm-export --precision` made
    optimizations: list[str] = field(default_factory=list)  # graph rewrites applied at export
    device: str = "cpu"  # where the parity gate ran (the device the bundle was made for)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def int8_record(self) -> dict[str, Any] | None:
        """`extra.int8` (the int8 recipe and the CPU that verified it) where a graph of this
        bundle is int8, {} for one written before that was recorded; None without int8 graphs."""
        precisions = self.extra.get("precision") if self.role == "lalm" else {"model": self.precision}
        if not isinstance(precisions, dict) or "int8" not in precisions.values():
            return None
        record = self.extra.get("int8")
        return record if isinstance(record, dict) else {}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {version!r} is not supported (this runtime reads version {FORMAT_VERSION}); "
                "export the bundle again with a matching lalm-export"
            )
        try:
            graphs = {
                name: GraphFile(
                    path=g["path"],
                    sha256=g["sha256"],
                    inputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in g["inputs"]),
                    outputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in g["outputs"]),
                    data_files=dict(g.get("data_files", {})),
                )
                for name, g in data["graphs"].items()
            }
            manifest = cls(
                family=data["family"],
                role=data["role"],
                model_type=data["model_type"],
                input_kind=data["input_kind"],
                graphs=graphs,
                dtype=data["dtype"],
                opset=int(data["opset"]),
                source=Source(**data["source"]),
                libraries=dict(data["libraries"]),
                parity=dict(data["parity"]),
                created=data["created"],
                extra=dict(data.get("extra", {})),
                precision=str(data.get("precision", "fp32")),
                optimizations=list(data.get("optimizations", [])),
                device=str(data.get("device", "cpu")),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise BundleError(f"manifest is incomplete or malformed ({type(err).__name__}: {err}); export the bundle again") from err
        if manifest.role not in ROLES:
            raise BundleError(f"manifest role {manifest.role!r} is not one of {', '.join(ROLES)}")
        missing = [name for name in ROLE_GRAPHS[manifest.role] if name not in manifest.graphs]
        if missing:
            raise BundleError(f"manifest names no {missing[0]!r} graph, which {manifest.role} bundles have; export the bundle again")
        return manifest

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


PathState = Literal["file", "folder", "missing", "denied"]


def path_state(path: str | Path) -> PathState:
    """What is at `path`: a file, a folder, nothing, or "denied" when a folder on the way may not
    be searched by this user (which `Path.exists()` raises on, and `os.path.exists()` calls missing)."""
    try:
        mode = os.stat(path).st_mode
    except PermissionError:
        return "denied"
    except (OSError, ValueError):
        return "missing"
    return "folder" if stat.S_ISDIR(mode) else "file"


def denied(what: str, path: str | Path) -> str:
    return f"{what} {path}: permission denied (it or a folder above it is not readable by this user); make it readable, or copy it where you can read it"


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`; a missing file, bad JSON or another JSON type is a `BundleError`."""
    path = Path(path)
    state = path_state(path)
    if state == "denied":
        raise BundleError(denied(what, path))
    if state == "folder":
        raise BundleError(f"{what} {path} is a folder, not a file")
    if state == "missing":
        raise BundleError(f"{what} {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{what} {path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise BundleError(f"{what} {path} must hold a JSON object")
    return data


def read_manifest(folder: str | Path) -> Manifest:
    """The manifest of a bundle folder, with a clear error when it is not one."""
    folder = Path(folder)
    state = path_state(folder)
    if state == "file":
        raise BundleError(f"bundle {folder} is a file; pass the bundle folder written by lalm-export")
    if state == "missing":
        raise BundleError(f"bundle {folder} does not exist; pass a folder written by lalm-export")
    path = folder / MANIFEST_NAME
    manifest_state = path_state(path)
    if "denied" in (state, manifest_state):
        raise BundleError(denied("bundle", folder))
    if manifest_state != "file":
        raise BundleError(f"{folder} is not a bundle (no {MANIFEST_NAME}); pass a folder written by lalm-export")
    return Manifest.from_dict(read_json_object(path, "manifest"))


def verify_graph_files(folder: str | Path, graph: GraphFile) -> Path:
    """The graph's path, after checking it and its external data against their sha256."""
    folder = Path(folder)
    root = folder.resolve()
    for relative, expected in {graph.path: graph.sha256, **graph.data_files}.items():
        file = folder / relative
        if not file.resolve().is_relative_to(root):
            raise BundleError(f"manifest of {folder} points at {relative}, outside the bundle; refusing to load it: export the bundle again")
        if not file.is_file():
            raise BundleError(f"bundle {folder} lacks {relative}; export it again")
        if sha256_of(file) != expected:
            raise BundleError(f"{file} does not match the sha256 in the manifest: it was modified or truncated; export the bundle again")
    return folder / graph.path


def read_tokenizer(folder: Path) -> Any:
    """The bundle's `tokenizer.json` (tokenizers' format), or a `BundleError` that says why not."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise BundleError(f"bundle {folder} lacks tokenizer.json; export it again")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception for a malformed file
        raise BundleError(f"{path} is not a tokenizer file tokenizers can read ({str(err)[:120]}); export the bundle again") from err


def is_whole_number(value: object, low: int, high: int | None = None) -> bool:
    """A bundle field that must be an integer from `low` to `high` (JSON's true and false are not numbers)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
