"""A user's own projector in an LALM: any `nn.Module` that maps the encoder's final hidden
states `(batch, frames, encoder hidden)` to decoder embeddings `(batch, frames', decoder hidden)`
(a convolutional downsampler, a Q-Former over windows, ...).

It is saved by its import path and its constructor's arguments, read from attributes of the
same names (`self.stride = stride`, scikit-learn's convention) or from a `config` dict, and
rebuilt from them; its code is imported only when the caller trusts it (`trust_remote_code`).
A module that changes the number of frames says how in a `frames(encoder_frames)` method,
written with integer arithmetic so that it also runs on the int64 tensors of an exported graph."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lalm_export.errors import OptionsError

PROBE_FRAMES = (5, 8)  # encoder frame counts the module is tried on when it is put in an LALM


class UserProjector(nn.Module):
    """The LALM's projector interface over a user's module: every encoder layer in, the
    module's output for the last one out; `frames` from the module, or the same count."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.module(hidden_states[-1])

    def frames(self, encoder_frames: Any) -> Any:
        rule = getattr(self.module, "frames", None)
        return rule(encoder_frames) if callable(rule) else encoder_frames


def import_path(module: nn.Module) -> str:
    """`package.module:Class` of a module's class, refused when it could not be imported again."""
    cls = type(module)
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise OptionsError(
            f"the projector's class {cls.__qualname__} is defined in a script or a function, where a saved LALM cannot import it "
            "again; define it at the top level of a module on the Python path"
        )
    return f"{cls.__module__}:{cls.__qualname__}"


def init_arguments(module: nn.Module) -> dict[str, Any]:
    """The keyword arguments that rebuild `module`: its `config` (a dict or dataclass), else the
    attributes named like its constructor's parameters. JSON values only."""
    config = getattr(module, "config", None)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        arguments = dataclasses.asdict(config)
    elif isinstance(config, dict):
        arguments = dict(config)
    else:
        parameters = inspect.signature(type(module).__init__).parameters.values()
        named = [p.name for p in parameters if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        missing = [name for name in named if not hasattr(module, name)]
        if missing:
            raise OptionsError(
                f"the projector {type(module).__qualname__} is saved by its constructor's arguments, but it keeps no attribute "
                f"{missing[0]!r}: store each argument under its own name (self.{missing[0]} = {missing[0]}) or give it a `config` dict"
            )
        arguments = {name: getattr(module, name) for name in named}
    try:
        json.dumps(arguments)
    except TypeError as err:
        raise OptionsError(f"the projector {type(module).__qualname__}'s constructor arguments must be JSON values (numbers, text, lists): {err}") from None
    return arguments


def check_projector(projector: UserProjector, encoder_hidden: int, decoder_hidden: int) -> None:
    """Try the module on short inputs: it must give decoder-sized embeddings, as many frames
    as its `frames` rule says (the same count when it has none)."""
    name = type(projector.module).__qualname__
    for frames in PROBE_FRAMES:
        with torch.no_grad():
            try:
                out = projector([torch.zeros(1, frames, encoder_hidden)])
            except Exception as err:  # noqa: BLE001 - any failure of user code is a clear error, not a traceback
                raise OptionsError(f"the projector {name} fails on encoder hidden states of shape (1, {frames}, {encoder_hidden}): {err}") from err
        expected = int(projector.frames(frames))
        if out.ndim != 3 or out.shape[1] != expected or out.shape[2] != decoder_hidden:
            rule = "its frames() rule" if callable(getattr(projector.module, "frames", None)) else "the same count (define frames(n) if it changes it)"
            raise OptionsError(
                f"the projector {name} maps (1, {frames}, {encoder_hidden}) to {tuple(out.shape)}; it must give "
                f"(1, {expected}, {decoder_hidden}): {expected} frames by {rule}, each of the decoder's hidden size"
            )


def projector_record(projector: UserProjector) -> dict[str, Any]:
    """`lalm_config.json`'s projector entry; the module is rebuilt from it at once, so a
    projector that could not be loaded again is refused when it is saved, not later."""
    record = {"class": import_path(projector.module), "init": init_arguments(projector.module)}
    rebuilt = build_user_projector(record, trust_remote_code=True)
    saved = {name: tuple(value.shape) for name, value in projector.module.state_dict().items()}
    again = {name: tuple(value.shape) for name, value in rebuilt.module.state_dict().items()}
    if saved != again:
        raise OptionsError(
            f"{record['class']}(**{record['init']}) does not rebuild the projector (its weights differ in names or shapes); keep every "
            "constructor argument under its own name, or give the module a `config` dict"
        )
    return record


def build_user_projector(record: dict[str, Any], trust_remote_code: bool) -> UserProjector:
    """The projector a `projector_record` describes, with fresh weights."""
    path = record["class"]
    if not trust_remote_code:
        raise OptionsError(
            f"this LALM's projector is user code ({path}); importing it runs that code: pass trust_remote_code=True "
            "(lalm-export --trust-remote-code) if you trust it"
        )
    module_name, _, qualname = path.partition(":")
    if "" not in sys.path:
        sys.path.append("")  # the current directory: where a console script does not look, and users keep their code
    try:
        target: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as err:
        raise OptionsError(f"cannot import the projector {path} ({err}); put its module on PYTHONPATH") from None
    try:
        return UserProjector(target(**record["init"]))
    except Exception as err:  # noqa: BLE001 - user code
        raise OptionsError(f"{path}(**{record['init']}) failed: {err}") from err
