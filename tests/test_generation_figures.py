"""The speed figures of generation leave compilation out: the first call of a new shape compiles
its graph, and its time is reported as compilation, not as slow tokens."""
import pytest

from llama_reference import mindsft_twin, random_hf_llama
from mindsft.generate import GenerationConfig, Generator

NEW_TOKENS = 6
NEVER_STOP = GenerationConfig(max_new_tokens=NEW_TOKENS, eos_token_id=-1)


@pytest.fixture(scope="module")
def model():
    return mindsft_twin(random_hf_llama())


@pytest.mark.parametrize("settings", [{}, {"num_beams": 2}], ids=["greedy", "beam_search"])
def test_first_calls_of_a_shape_count_as_compilation_and_later_ones_as_speed(model, settings):
    generator = Generator(model)
    prompts = [[5, 6, 7], [8, 9]]
    config = NEVER_STOP.updated(**settings)
    rows = len(prompts) * config.num_beams
    first = generator.generate(prompts, config)
    assert first.compile_seconds > 0
    assert first.prefill_tokens == 5 and first.timed_prefill_tokens == 0 and first.prefill_tokens_per_second == 0
    # The first new token comes from the prefill, each other one from a decode forward, of which
    # the first compiles.
    timed_steps = NEW_TOKENS - 2
    assert first.decode_tokens == rows * timed_steps
    again = generator.generate(prompts, config)
    assert again.compile_seconds == 0
    assert again.timed_prefill_tokens == again.prefill_tokens == 5
    assert again.decode_tokens == rows * (timed_steps + 1)
    assert again.sequences == first.sequences
