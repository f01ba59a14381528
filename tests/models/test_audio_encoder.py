"""The usage guide's audio-encoder examples, for every encoder family."""

from __future__ import annotations

import pytest
import torch

from lalm_export.demo.tiny import tiny_input
from lalm_export.errors import AdapterMismatchError, CorruptWeightsError, ModelLoadError, OptionsError
from lalm_export.models import ENCODER_CLASSES, BaseAudioEncoder, WhisperAudioEncoder


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_encoder(family, checkpoints, **kwargs):
    return ENCODER_CLASSES[family](str(checkpoints[family]), use_lora=True, lora_r=8, lora_alpha=16, lora_dropout=0.0, **kwargs)


def train_step(model, family: str, seed: int = 1) -> None:
    torch.manual_seed(seed)  # training mode draws LayerDrop / SpecAugment masks: the same step every run
    model.set_training_mode()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    # One feature, not the mean square: the final layer norm makes the mean square ~1 whatever
    # the weights, so its gradient (~1e-9) left the weights unchanged under some thread counts.
    loss = model(tiny_input(family, batch=1, seed=seed))[-1][..., 0].mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_frozen_has_no_trainable_parameter(encoder_family, checkpoints):
    model = ENCODER_CLASSES[encoder_family](str(checkpoints[encoder_family]), finetune=False)
    assert trainable(model) == 0


def test_finetune_trains_everything(encoder_family, checkpoints):
    model = ENCODER_CLASSES[encoder_family](str(checkpoints[encoder_family]), finetune=True)
    assert trainable(model) == sum(p.numel() for p in model.parameters()) > 0


def test_lora_trains_only_adapter_parameters(encoder_family, checkpoints):
    model = lora_encoder(encoder_family, checkpoints)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert 0 < trainable(model) < sum(p.numel() for p in model.parameters())


def test_every_lora_layer_is_on_the_forward_path(encoder_family, checkpoints):
    """An adapter on a layer the model reads by `.weight` instead of calling (WavLM's attention
    projections) would get no gradient and train nothing: the family's targets must all learn."""
    model = lora_encoder(encoder_family, checkpoints)
    model.set_training_mode()
    model.eval()  # no LayerDrop: every layer runs
    model(tiny_input(encoder_family, batch=1))[-1].pow(2).mean().backward()
    dead = [n for n, p in model.named_parameters() if "lora_B" in n and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not dead, f"LoRA layers that receive no gradient: {dead[:4]}"


def test_forward_returns_every_layer(encoder_family, checkpoints):
    model = ENCODER_CLASSES[encoder_family](str(checkpoints[encoder_family]))
    hidden = model(tiny_input(encoder_family, batch=2))
    layers = model.encoder.config.num_hidden_layers
    assert isinstance(hidden, tuple) and len(hidden) == layers + 1
    assert all(h.shape[0] == 2 and h.shape[-1] == model.get_hidden_size() == 64 for h in hidden)
    if encoder_family == "whisper":
        assert hidden[-1].shape[1] == 1500  # 3000 mel frames, stride 2
        assert model.encoder.config.num_mel_bins == 80


def test_inference_runs_without_grad(encoder_family, checkpoints):
    model = ENCODER_CLASSES[encoder_family](str(checkpoints[encoder_family]), finetune=True)
    model.set_inference_mode()
    assert trainable(model) == 0 and not model.training
    out = model.inference(tiny_input(encoder_family, batch=1))
    assert not out[-1].requires_grad


def test_set_training_mode_restores_the_adapter_only(encoder_family, checkpoints):
    model = lora_encoder(encoder_family, checkpoints)
    model.set_inference_mode()
    model.set_training_mode()
    assert model.training
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_lora_round_trip_gives_identical_outputs(encoder_family, checkpoints, tmp_path):
    model = lora_encoder(encoder_family, checkpoints)
    train_step(model, encoder_family)
    model.save_lora_weights(tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    reloaded = lora_encoder(encoder_family, checkpoints)
    reloaded.load_lora_weights(tmp_path / "lora")
    x = tiny_input(encoder_family, batch=1, seed=5)
    model.set_inference_mode()
    reloaded.set_inference_mode()
    torch.testing.assert_close(reloaded.inference(x)[-1], model.inference(x)[-1], rtol=0, atol=0)


def test_continuous_learning_changes_the_outputs(encoder_family, checkpoints, tmp_path):
    first = lora_encoder(encoder_family, checkpoints)
    train_step(first, encoder_family)
    first.save_lora_weights(tmp_path / "checkpoint_1")
    second = lora_encoder(encoder_family, checkpoints)
    second.load_lora_weights(tmp_path / "checkpoint_1")
    x = tiny_input(encoder_family, batch=1, seed=5)
    second.set_inference_mode()
    before = second.inference(x)[-1]
    train_step(second, encoder_family, seed=2)
    second.save_lora_weights(tmp_path / "checkpoint_2")
    second.set_inference_mode()
    assert not torch.allclose(second.inference(x)[-1], before)
    third = lora_encoder(encoder_family, checkpoints)
    third.load_lora_weights(tmp_path / "checkpoint_2")
    third.set_inference_mode()
    torch.testing.assert_close(third.inference(x)[-1], second.inference(x)[-1], rtol=0, atol=0)


def test_full_weights_round_trip(encoder_family, checkpoints, tmp_path):
    trained = ENCODER_CLASSES[encoder_family](str(checkpoints[encoder_family]), finetune=True)
    train_step(trained, encoder_family)
    trained.save_model_weights(tmp_path / "weights")
    fresh = ENCODER_CLASSES[encoder_family](str(checkpoints[encoder_family]))
    fresh.load_model_weights(tmp_path / "weights")
    x = tiny_input(encoder_family, batch=1, seed=3)
    trained.set_inference_mode()
    fresh.set_inference_mode()
    torch.testing.assert_close(fresh.inference(x)[-1], trained.inference(x)[-1], rtol=0, atol=0)


def test_qlora_forward_and_backward_on_cpu(encoder_family, checkpoints):
    import bitsandbytes as bnb

    model = ENCODER_CLASSES[encoder_family](str(checkpoints[encoder_family]), use_qlora=True, lora_r=8, lora_alpha=16, lora_dropout=0.0)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert next(model.parameters()).device.type == "cpu"
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    model.set_training_mode()
    out = model(tiny_input(encoder_family, batch=1))
    out[-1].pow(2).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# --- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"finetune": True, "use_lora": True}, "choose full fine-tuning"),
        ({"finetune": True, "use_qlora": True}, "choose full fine-tuning"),
        ({"use_lora": True, "use_qlora": True}, "choose one"),
        ({"use_qlora": True, "load_in_4bit": False}, "load_in_4bit=True"),
        ({"use_lora": True, "lora_r": 0}, "positive rank"),
        ({"use_qlora": True, "bnb_4bit_quant_type": "int3"}, "'nf4' or 'fp4'"),
    ],
)
def test_contradictory_flags_raise_value_error(checkpoints, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        WhisperAudioEncoder(str(checkpoints["whisper"]), **kwargs)


def test_base_class_is_abstract(checkpoints):
    with pytest.raises(TypeError, match="abstract"):
        BaseAudioEncoder(str(checkpoints["whisper"]))


def test_missing_model_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        WhisperAudioEncoder(str(tmp_path / "nowhere"))


def test_folder_without_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="holds no model"):
        WhisperAudioEncoder(str(tmp_path / "empty"))


def test_adapter_of_another_family_is_refused(checkpoints, tmp_path):
    hubert = lora_encoder("hubert", checkpoints)
    hubert.save_lora_weights(tmp_path / "hubert_lora")
    wav2vec2 = lora_encoder("wav2vec2", checkpoints)
    with pytest.raises(AdapterMismatchError, match="'hubert' family"):
        wav2vec2.load_lora_weights(tmp_path / "hubert_lora")


@pytest.mark.parametrize("settings", [{"lora_r": 4}, {"lora_alpha": 64}], ids=["rank", "alpha"])
def test_adapter_of_another_rank_or_alpha_says_how_to_build_the_model(settings, checkpoints, tmp_path):
    lora_encoder("hubert", checkpoints).save_lora_weights(tmp_path / "r8")  # r=8, alpha=16: scale 2
    model = ENCODER_CLASSES["hubert"](str(checkpoints["hubert"]), use_lora=True, **settings)
    with pytest.raises(AdapterMismatchError, match=r"trained with lora_r=8, lora_alpha=16.*construct it with lora_r=8, lora_alpha=16"):
        model.load_lora_weights(tmp_path / "r8")


def test_adapter_with_other_target_modules_is_refused(checkpoints, tmp_path):
    lora_encoder("wav2vec2", checkpoints).save_lora_weights(tmp_path / "attn")
    model = lora_encoder("wav2vec2", checkpoints, lora_target_modules=("intermediate_dense",))
    with pytest.raises(AdapterMismatchError, match="does not have"):
        model.load_lora_weights(tmp_path / "attn")


def test_corrupt_adapter_file(checkpoints, tmp_path):
    lora_encoder("hubert", checkpoints).save_lora_weights(tmp_path / "lora")
    weights = tmp_path / "lora" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CorruptWeightsError, match="truncated or corrupt"):
        lora_encoder("hubert", checkpoints).load_lora_weights(tmp_path / "lora")


def test_missing_adapter_folder(checkpoints, tmp_path):
    with pytest.raises(AdapterMismatchError, match="does not exist"):
        lora_encoder("hubert", checkpoints).load_lora_weights(tmp_path / "nope")


def test_full_weights_of_another_model_are_refused(checkpoints, tmp_path):
    ENCODER_CLASSES["hubert"](str(checkpoints["hubert"]), finetune=True).save_model_weights(tmp_path / "w")
    with pytest.raises(AdapterMismatchError, match="'hubert' family"):
        ENCODER_CLASSES["whisper"](str(checkpoints["whisper"])).load_model_weights(tmp_path / "w")


def test_lora_methods_need_an_adapter(checkpoints, tmp_path):
    model = ENCODER_CLASSES["hubert"](str(checkpoints["hubert"]))
    with pytest.raises(OptionsError, match="use_lora=True"):
        model.save_lora_weights(tmp_path / "x")
    with pytest.raises(OptionsError, match="save_lora_weights"):
        lora_encoder("hubert", checkpoints).save_model_weights(tmp_path / "y")


def test_lora_on_layers_read_by_weight_is_refused(checkpoints):
    """WavLM passes its attention projections' weights to F.multi_head_attention_forward:
    an adapter there would get no gradient, so asking for one is an error, not a silent no-op."""
    with pytest.raises(OptionsError, match=r"wavlm reads q_proj by weight .*\(default: intermediate_dense, output_dense\)"):
        ENCODER_CLASSES["wavlm"](str(checkpoints["wavlm"]), use_lora=True, lora_target_modules=("q_proj", "intermediate_dense"))
