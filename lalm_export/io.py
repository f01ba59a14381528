"""Reading checkpoints and weight files, with errors a user can act on. Weights are
safetensors only: nothing here unpickles."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lalm_export.errors import CorruptWeightsError, ModelLoadError, OutputExistsError, OutputPathError
from runtime.errors import BundleError
from runtime.manifest import denied, path_state, read_json_object, sha256_of


def looks_like_local_path(name: str) -> bool:
    """A hub id is `org/name`; anything else with a separator, or a dot or tilde prefix, is a
    path, and so is a name that exists here (or would, but a folder on the way is not searchable)."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or path_state(name) != "missing"


def check_model_source(name: str) -> None:
    """Fail early, with the fix, on a local path that is missing, unreadable or holds no model."""
    if not looks_like_local_path(name):
        return
    path = Path(name).expanduser()
    state = path_state(path)
    if state == "denied":
        raise ModelLoadError(denied("model path", name))
    if state == "missing":
        raise ModelLoadError(f"model path {name} does not exist; pass a folder saved with save_pretrained()")
    if state == "file":
        raise ModelLoadError(f"model path {name} is a file; pass the checkpoint folder (saved with save_pretrained()) that holds it")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ModelLoadError(denied("model path", name))
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{name} holds no model (no config.json); pass a folder saved with save_pretrained()")


def load_hf_model(cls: Any, name: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained(name)` with local-path checks and one-line errors."""
    check_model_source(name)
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = "" if looks_like_local_path(name) else " (offline? pass a local checkpoint folder with --model)"
        raise ModelLoadError(f"cannot load model {name!r}: {first_line}{hint}") from err


def load_hf_config(name: str, trust_remote_code: bool = False) -> Any:
    """The checkpoint's config (`AutoConfig`), with the same checks and one-line errors as `load_hf_model`."""
    from transformers import AutoConfig

    return load_hf_model(AutoConfig, name, trust_remote_code=trust_remote_code)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing, truncated or foreign file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CorruptWeightsError(f"weights file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptWeightsError(f"{path} is not a readable safetensors file ({err}); it may be truncated or corrupt: save it again") from err


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    # clone: tied weights (a decoder's embedding and lm_head) share storage, which safetensors refuses
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def read_json(path: str | Path, what: str) -> dict[str, Any]:
    """`runtime.manifest.read_json_object`, raising this package's `CorruptWeightsError`."""
    try:
        return read_json_object(path, what)
    except BundleError as err:
        raise CorruptWeightsError(str(err)) from err


def write_json(data: dict[str, Any], path: str | Path) -> None:
    """Write through a temporary file beside `path`: a process killed mid-write leaves the
    previous file whole."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    temporary.replace(path)


def sha256_tree(folder: str | Path) -> str:
    """One digest over every file of a folder (relative names and contents)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(file.relative_to(folder).as_posix().encode())
        digest.update(sha256_of(file).encode())
    return digest.hexdigest()


PARTIAL_MARK = ".lalm-export-partial"  # in a folder being written: what the next write may clean up


@contextmanager
def atomic_folder(target: str | Path, replace: bool, keep_others: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it takes `target`'s place.
    `keep_others`: what an existing `target` holds under names the new folder does not use
    moves into it (a user's files in a model folder), instead of going with the old folder.

    An exception (an interrupt included) leaves `target` as it was and removes the temporary
    folder and any parent folders made for it, so a failed write leaves nothing behind. The
    temporary folder is named `.NAME.partial-PID-*`: the next write to `target` removes those
    whose process is gone (killed exports), and no other files."""
    target = Path(target).expanduser().resolve()
    made = make_parents(target.parent)
    remove_stale_partials(target)
    done = False
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
        (tmp / PARTIAL_MARK).touch()
    except PermissionError:
        remove_made(made)
        raise OutputPathError(f"{target}: no permission to write in {target.parent}; pass a path in a folder you can write to") from None
    try:
        yield tmp
        (tmp / PARTIAL_MARK).unlink()
        give_umask(tmp)
        _move_into_place(tmp, target, replace, keep_others)
        done = True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            remove_made(made)


def give_umask(folder: Path) -> None:
    """`folder` and everything under it as the user's umask makes them: mkdtemp makes the folder
    0700 and some writers make their files 0600 (ONNX's external weights file, transformers'
    safetensors shards), which would make a bundle on a path every node reads its owner's alone."""
    mask = current_umask()
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def current_umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _move_into_place(tmp: Path, target: Path, replace: bool, keep_others: bool = False) -> None:
    raced = OutputExistsError(f"{target} was written by another process while this one ran; nothing of this run was kept")
    if target.exists():
        if not replace:
            raise raced
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        tmp.rename(target)
        if keep_others:  # moved after the swap: until then they stay in the old folder, never in a partial one
            for entry in old.iterdir():
                if not (target / entry.name).exists():
                    entry.rename(target / entry.name)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        tmp.rename(target)
    except OSError as err:  # another process renamed its folder into place first (ENOTEMPTY / EEXIST)
        raise raced from err


def make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; return those created, outermost first. A
    parent that is a file, or no permission, is an `OutputPathError`."""
    missing = []
    for candidate in [folder, *folder.parents]:
        if candidate.exists():
            if not candidate.is_dir():
                raise OutputPathError(f"{candidate} is a file, so {folder} cannot be created under it; pass another path")
            break
        missing.append(candidate)
    made = []
    try:
        for candidate in reversed(missing):
            candidate.mkdir()
            made.append(candidate)
    except PermissionError:
        remove_made(made)
        raise OutputPathError(f"no permission to create {candidate}; pass a path in a folder you can write to") from None
    return made


def remove_made(made: list[Path]) -> None:
    """Remove the folders `make_parents` created, innermost first, where still empty."""
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:
            return


def remove_stale_partials(target: Path) -> list[Path]:
    """Remove `.NAME.partial-PID-*` folders beside `target` that this tool made (they hold its
    mark) and whose process no longer runs; a folder of the same name without the mark is not ours."""
    removed = []
    for candidate in target.parent.glob(f".{target.name}.partial-*"):
        pid = candidate.name.removeprefix(f".{target.name}.partial-").split("-", 1)[0]
        ours = (candidate / PARTIAL_MARK).is_file() and not candidate.is_symlink()
        if ours and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
