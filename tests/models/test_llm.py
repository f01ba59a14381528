"""The usage guide's LLM-decoder examples."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lalm_export.errors import AdapterMismatchError, ModelLoadError, OptionsError
from lalm_export.models import LLMDecoder

PROMPT = "The capital of France is"


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_decoder(checkpoints, **kwargs) -> LLMDecoder:
    return LLMDecoder(str(checkpoints["llm"]), use_lora=True, lora_r=16, lora_alpha=32, lora_dropout=0.0, **kwargs)


def train_step(model: LLMDecoder, text: str = "hello, how are you?") -> None:
    model.train()
    batch = model.tokenizer(text, return_tensors="pt")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(batch.input_ids, batch.attention_mask, labels=batch.input_ids).loss.backward()
    optimizer.step()


def test_frozen_decoder(checkpoints):
    assert trainable(LLMDecoder(str(checkpoints["llm"]))) == 0


@pytest.mark.parametrize("flag", ["use_lora", "use_qlora"])
def test_adapter_modes_train_only_lora(checkpoints, flag):
    model = LLMDecoder(str(checkpoints["llm"]), **{flag: True})
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)


def test_tokenizer_round_trip_and_pad_token(checkpoints):
    model = LLMDecoder(str(checkpoints["llm"]))
    text = "Hello, how are you?"
    assert model.tokenizer.decode(model.tokenizer.encode(text)) == text
    assert model.tokenizer.pad_token == model.tokenizer.eos_token == "</s>"


def test_forward_logits_and_loss(checkpoints):
    model = LLMDecoder(str(checkpoints["llm"]))
    batch = model.tokenizer(PROMPT, return_tensors="pt")
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.input_ids.clone())
    assert out.logits.shape == (1, batch.input_ids.shape[1], len(model.tokenizer))
    assert torch.isfinite(out.loss) and out.loss.item() > 0


def test_generate_equals_the_hf_model(checkpoints):
    model = LLMDecoder(str(checkpoints["llm"]))
    model.eval()
    ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
    ours = model.generate(input_ids=ids, max_new_tokens=20, do_sample=False, temperature=1.0)
    hf = AutoModelForCausalLM.from_pretrained(str(checkpoints["llm"])).eval()
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, max_new_tokens=20, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    assert ours.shape[1] > ids.shape[1]
    assert torch.equal(ours, theirs)


def test_input_embeddings(checkpoints):
    model = LLMDecoder(str(checkpoints["llm"]))
    embeddings = model.get_input_embeddings()
    assert embeddings.weight.shape == (len(model.tokenizer), model.get_hidden_size())
    assert embeddings(torch.tensor([[1, 2, 3]])).shape == (1, 3, 64)


def test_lora_round_trip_and_continuous_learning(checkpoints, tmp_path):
    first = lora_decoder(checkpoints)
    train_step(first)
    first.save_lora_weights(tmp_path / "checkpoint_1")
    second = lora_decoder(checkpoints)
    second.load_lora_weights(tmp_path / "checkpoint_1")
    ids = first.tokenizer(PROMPT, return_tensors="pt").input_ids
    first.eval()
    second.eval()
    with torch.no_grad():
        torch.testing.assert_close(second(ids).logits, first(ids).logits, rtol=0, atol=0)
        before = second(ids).logits
    train_step(second, "one two three four")
    second.eval()
    with torch.no_grad():
        assert not torch.allclose(second(ids).logits, before)
    second.save_lora_weights(tmp_path / "checkpoint_2")


def test_qlora_forward_backward_on_cpu(checkpoints):
    model = LLMDecoder(str(checkpoints["llm"]), use_qlora=True, lora_dropout=0.0)
    model.train()
    batch = model.tokenizer(PROMPT, return_tensors="pt")
    model(batch.input_ids, batch.attention_mask, labels=batch.input_ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_decoder_adapter_into_encoder_family_is_refused(checkpoints, tmp_path):
    from lalm_export.models import HubertAudioEncoder

    lora_decoder(checkpoints).save_lora_weights(tmp_path / "llm_lora")
    with pytest.raises(AdapterMismatchError, match="'llm' family"):
        HubertAudioEncoder(str(checkpoints["hubert"]), use_lora=True).load_lora_weights(tmp_path / "llm_lora")


def test_bad_paths_and_flags(checkpoints, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLMDecoder(str(tmp_path / "missing"))
    with pytest.raises(OptionsError, match="choose one"):
        LLMDecoder(str(checkpoints["llm"]), use_lora=True, use_qlora=True)
    with pytest.raises(OptionsError, match="use_lora=True"):
        LLMDecoder(str(checkpoints["llm"])).load_lora_weights(tmp_path)
