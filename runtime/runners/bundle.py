"""What every runner shares: a bundle's manifest read, its graph verified and opened (an
optimized copy reused while it matches), and the context length of a decoder bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runtime.errors import BundleError
from runtime.manifest import Manifest, read_json_object, read_manifest, sha256_of, verify_graph_files
from runtime.sessions import SessionOptions, active_provider, open_bundle_graph, provider_label, resolve_providers


class BundleModel:
    """An encoder or decoder bundle: its manifest and its one verified, opened graph."""

    audio_token: str | None = None  # the placeholder of audio in a prompt: an audio LLM's only
    chat_template: Any = None  # a checkpoint's chat template: an audio LLM's only

    def card_facts(self) -> dict[str, Any]:
        """What a server's model list adds for this bundle (an audio LLM: its prompt)."""
        return {}

    def __init__(self, folder: str | Path, options: SessionOptions) -> None:
        self.folder = Path(folder)
        self.manifest: Manifest = read_manifest(self.folder)
        source = verify_graph_files(self.folder, self.manifest.graphs["model"])
        reusable = None if options.save_optimized else saved_optimized_graph(source, options)
        self.graph_path = reusable or source
        if reusable is not None:  # already optimized for this provider: skip that work at start-up
            options = SessionOptions(**{**options.__dict__, "optimization": "disable"})
        self.session = open_bundle_graph(self.graph_path, options, self.manifest.graphs["model"], self.folder)
        self.provider = active_provider(self.session)
        if options.save_optimized:
            record_optimized_graph(source, self.provider)
        self.output_names = [o.name for o in self.session.get_outputs()]


def _optimized_record(graph: Path) -> Path:
    return graph.with_suffix(".optimized.json")


def record_optimized_graph(source: Path, provider: str) -> None:
    """Tie the optimized graph to the verified graph it came from and to its provider:
    it is reused only while both match, and only if its own sha256 still matches."""
    optimized = source.with_suffix(".optimized.onnx")
    record = {"source_sha256": sha256_of(source), "sha256": sha256_of(optimized), "provider": provider}
    _optimized_record(source).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def saved_optimized_graph(source: Path, options: SessionOptions) -> Path | None:
    optimized, record_path = source.with_suffix(".optimized.onnx"), _optimized_record(source)
    if not (optimized.is_file() and record_path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    same_provider = record.get("provider") == provider_label(resolve_providers(options.provider)[0])
    if same_provider and record.get("source_sha256") == sha256_of(source) and record.get("sha256") == sha256_of(optimized):
        return optimized
    return None


def context_length(manifest: Manifest, folder: Path) -> int:
    """The positions the decoder was exported for: from the manifest, else (bundles written
    before it recorded them) the bundle's config.json."""
    recorded = manifest.extra.get("context_length")
    if isinstance(recorded, int) and recorded > 0:
        return recorded
    config = read_json_object(folder / "config.json", "bundle file")
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int) or positions < 1:
        raise BundleError(f"bundle {folder} records no context length (manifest extra.context_length or config max_position_embeddings)")
    return positions
