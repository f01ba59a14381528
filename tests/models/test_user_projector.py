"""An LALM with a projector of the user's own: saved by import path and arguments, rebuilt
only with trust_remote_code, exported with --trust-remote-code, and the bundle's tokens equal
the eager model's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lalm_export.cli import main as export_main
from lalm_export.errors import OptionsError
from lalm_export.models import LALM, LLMDecoder, encoder_class
from lalm_export.parity.signals import speech_like
from runtime.api import load
from runtime.generation import GenerationOptions
from tests.helpers import assert_user_error, randomize_lora, run_main
from tests.models.user_projectors import ConfiguredLinear, ConvDownsampler, ForgetsItsArguments, HalvingWithoutRule

CLIPS = (speech_like(1.0), speech_like(1.7, seed=3))


def parts(checkpoints, family: str = "hubert"):
    encoder = encoder_class(family)(str(checkpoints[family]), use_lora=True, lora_dropout=0.0)
    decoder = LLMDecoder(str(checkpoints["llm"]), use_lora=True, lora_dropout=0.0)
    randomize_lora(encoder, seed=1)
    randomize_lora(decoder, seed=2)
    return encoder, decoder


def conv_lalm(checkpoints, family: str = "hubert") -> LALM:
    encoder, decoder = parts(checkpoints, family)
    torch.manual_seed(0)
    return LALM(encoder, decoder, ConvDownsampler(encoder.get_hidden_size(), decoder.get_hidden_size(), stride=2))


def test_a_users_projector_is_saved_by_import_path_and_reloaded_only_when_trusted(checkpoints, tmp_path):
    model = conv_lalm(checkpoints)
    model.set_inference_mode()
    expected = model.generate(list(CLIPS), max_new_tokens=10)
    assert [len(f) for f in model.audio_features(list(CLIPS))] == [model.projector.frames(n) for n in model.encoder_inputs(list(CLIPS))[1]]
    model.save_pretrained(tmp_path / "lalm")
    with pytest.raises(OptionsError, match="projector is user code .*ConvDownsampler.*trust_remote_code=True"):
        LALM.from_pretrained(tmp_path / "lalm")
    reloaded = LALM.from_pretrained(tmp_path / "lalm", trust_remote_code=True)
    reloaded.set_inference_mode()
    assert reloaded.generate(list(CLIPS), max_new_tokens=10) == expected


def test_a_projector_with_a_config_dict_round_trips(checkpoints, tmp_path):
    encoder, decoder = parts(checkpoints)
    model = LALM(encoder, decoder, ConfiguredLinear([encoder.get_hidden_size(), decoder.get_hidden_size()]))
    model.save_pretrained(tmp_path / "lalm")
    reloaded = LALM.from_pretrained(tmp_path / "lalm", trust_remote_code=True)
    assert torch.equal(reloaded.projector.module.linear.weight, model.projector.module.linear.weight)


def test_the_bundle_of_an_lalm_with_a_users_projector_gives_the_eager_tokens(checkpoints, audio_files, tmp_path, capsys):
    model = conv_lalm(checkpoints, "wav2vec2")
    model.save_pretrained(tmp_path / "lalm")
    refused = run_main(export_main, "--lalm", tmp_path / "lalm", "--output", tmp_path / "bundle", capsys=capsys)
    assert refused.returncode == 1
    assert_user_error(refused, "pass trust_remote_code=True (lalm-export --trust-remote-code)")
    assert not (tmp_path / "bundle").exists()
    exported = run_main(export_main, "--lalm", tmp_path / "lalm", "--output", tmp_path / "bundle", "--trust-remote-code", "-q", capsys=capsys)
    assert exported.returncode == 0, exported.stderr
    model.set_inference_mode()
    from runtime.audio import load_audio

    clips = [load_audio(path).samples for path in audio_files]
    expected = [tokens for _, tokens in model.generate(clips, max_new_tokens=24, stop_at_eos=False)]
    ours = load(tmp_path / "bundle").transcribe(audio_files, options=GenerationOptions(max_new_tokens=24, stop_at_eos=False))
    assert [t.tokens for t in ours] == expected


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda e, d: HalvingWithoutRule(e, d), "it must give (1, 5, 64): 5 frames by the same count (define frames(n) if it changes it)"),
        (lambda e, d: nn.Linear(e, d + 1), "each of the decoder's hidden size"),
        (lambda e, d: nn.Linear(e + 1, d), "fails on encoder hidden states of shape (1, 5,"),
    ],
    ids=["frames changed without a rule", "wrong output size", "wrong input size"],
)
def test_a_projector_that_does_not_fit_is_refused_when_the_lalm_is_built(make, fragment, checkpoints):
    encoder, decoder = parts(checkpoints)
    with pytest.raises(OptionsError) as raised:
        LALM(encoder, decoder, make(encoder.get_hidden_size(), decoder.get_hidden_size()))
    assert fragment.replace("64", str(decoder.get_hidden_size())) in str(raised.value)


def test_a_projector_that_could_not_be_rebuilt_is_refused_when_saved(checkpoints, tmp_path):
    encoder, decoder = parts(checkpoints)

    class InAFunction(nn.Linear):
        pass

    cases = [
        (ForgetsItsArguments(encoder.get_hidden_size(), decoder.get_hidden_size()), "keeps no attribute 'encoder_hidden'"),
        (InAFunction(encoder.get_hidden_size(), decoder.get_hidden_size()), "defined in a script or a function"),
    ]
    for projector, fragment in cases:
        model = LALM(encoder, decoder, projector)
        with pytest.raises(OptionsError, match=fragment):
            model.save_pretrained(tmp_path / "lalm")
        assert not (tmp_path / "lalm").exists()
