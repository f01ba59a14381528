"""The generation loop and token choice on hand-placed logits: no model needed."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import RuntimeUserError
from runtime.generation import GenerationOptions, choose_tokens, generate


def sampled(logits: list[float], draws: int = 2000, **options) -> set[int]:
    """Every token `choose_tokens` picks from one row of logits over many draws."""
    rng = np.random.default_rng(0)
    opts = GenerationOptions(temperature=1.0, **options)
    row = np.array([logits])
    return {int(choose_tokens(row, opts, rng)[0]) for _ in range(draws)}


def test_greedy_takes_the_largest_logit_of_each_row():
    logits = np.array([[0.1, 3.0, 2.9], [5.0, -1.0, 4.99]])
    assert choose_tokens(logits, GenerationOptions(), np.random.default_rng(0)).tolist() == [1, 0]


def test_top_k_keeps_only_the_k_largest():
    logits = [2.0, 1.9, 1.8, 0.0, -0.5]
    assert sampled(logits, top_k=2) == {0, 1}
    assert sampled(logits, top_k=1) == {0}
    assert sampled(logits) == {0, 1, 2, 3, 4}  # no filter: every token is drawn sometimes


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    # probabilities 0.5, 0.3, 0.15, 0.05: 0.5 + 0.3 passes 0.79, so the nucleus is {0, 1}
    logits = np.log([0.5, 0.3, 0.15, 0.05]).tolist()
    assert sampled(logits, top_p=0.79) == {0, 1}
    assert sampled(logits, top_p=0.81) == {0, 1, 2}
    assert sampled(logits, top_p=0.1) == {0}  # always at least the best token


def test_low_temperature_concentrates_on_the_best_token():
    logits = [1.0, 0.9]
    assert sampled(logits, draws=300) == {0, 1}
    rng = np.random.default_rng(0)
    cold = GenerationOptions(temperature=0.01)
    assert {int(choose_tokens(np.array([logits]), cold, rng)[0]) for _ in range(300)} == {0}


class ScriptedBackend:
    """A backend whose logits put each row's next token where a script says."""

    def __init__(self, script: list[list[int]], vocab: int = 8) -> None:
        self.script, self.vocab = script, vocab
        self.step = 0
        self.reserved: int | None = None
        self.decode_steps = 0

    def reserve(self, total_length: int) -> None:
        self.reserved = total_length

    def _logits(self) -> np.ndarray:
        logits = np.zeros((len(self.script), self.vocab))
        for row, tokens in enumerate(self.script):
            logits[row, tokens[min(self.step, len(tokens) - 1)]] = 1.0
        self.step += 1
        return logits

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self._logits()

    def decode_step(self, token_ids: np.ndarray) -> np.ndarray:
        self.decode_steps += 1
        return self._logits()


def test_rows_end_at_eos_and_are_padded_with_it():
    backend = ScriptedBackend([[3, 2, 5, 5], [4, 4, 4, 2]])
    prompt = np.ones((2, 3), dtype=np.int64)
    tokens = generate(backend, prompt, np.ones_like(prompt), GenerationOptions(max_new_tokens=6, eos_token_id=2))
    assert tokens.tolist() == [[3, 2, 2, 2], [4, 4, 4, 2]]
    assert backend.reserved == 3 + 6  # the protocol's reserve: prompt + new tokens, once, before prefill


def test_stop_at_eos_false_runs_to_max_new_tokens():
    backend = ScriptedBackend([[3, 2, 5]])
    prompt = np.ones((1, 2), dtype=np.int64)
    options = GenerationOptions(max_new_tokens=4, eos_token_id=2, stop_at_eos=False)
    assert generate(backend, prompt, np.ones_like(prompt), options).tolist() == [[3, 2, 5, 5]]


def test_stop_predicate_ends_rows_and_on_step_sees_every_step():
    backend = ScriptedBackend([[1, 6, 7, 7]])
    prompt = np.ones((1, 2), dtype=np.int64)
    seen: list[list[int]] = []
    tokens = generate(
        backend,
        prompt,
        np.ones_like(prompt),
        GenerationOptions(max_new_tokens=8),
        stop=lambda t: t[:, -1] == 6,
        on_step=lambda t: seen.append(t[0].tolist()),
    )
    assert tokens.tolist() == [[1, 6]]
    assert seen == [[1], [1, 6]]
    assert backend.decode_steps == 1  # no step is run after every row has ended


@pytest.mark.parametrize(
    "options, fragment",
    [
        (GenerationOptions(max_new_tokens=0), "max_new_tokens"),
        (GenerationOptions(temperature=-1.0), "temperature"),
        (GenerationOptions(top_k=-2), "top_k"),
        (GenerationOptions(top_p=0.0), "top_p"),
    ],
)
def test_bad_options_are_user_errors(options, fragment):
    with pytest.raises(RuntimeUserError, match=fragment):
        options.validate()
