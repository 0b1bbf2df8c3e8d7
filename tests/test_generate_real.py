"""Greedy generation from the embedded SmolLM2 equals transformers' `generate(do_sample=False)` token for token."""

import numpy as np
import pytest

PROMPTS = [
    "def fibonacci(n):\n    ",
    "The three most important data structures in Python are",
    "Once upon a time, in a small village,",
    "The capital of France is Paris. The capital of Germany is",
]


@pytest.mark.real_model
@pytest.mark.slow
def test_greedy_32_tokens_equal_transformers(smollm2_jax, smollm2_hf):
    import torch

    from spotlight_jax.generate import generate

    model, tokenizer, _ = smollm2_jax
    ours = generate(model, PROMPTS, tokenizer=tokenizer, max_new_tokens=32)  # one ragged batch
    for i, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = smollm2_hf.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                pad_token_id=tokenizer.eos_token_id,
            )[0, ids.shape[1] :].numpy()  # fmt: skip
        n = int(ours.lengths[i])
        assert n == len(ref), f"prompt {i}: we generated {n} tokens, transformers {len(ref)}"
        np.testing.assert_array_equal(ours.tokens[i, :n], ref, err_msg=f"prompt {i}: {prompt!r}")
    assert ours.lengths.min() >= 8  # the comparison covers real continuations, not an immediate EOS
