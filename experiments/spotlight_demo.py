# %% [markdown]
# # Dense vs Spotlight decoding, side by side
#
# Loads the embedded SmolLM2-135M-Instruct and a trained hash checkpoint (from `python -m spotlight_jax.train`,
# default output `runs/hash-smollm2-135m/hashes`), then decodes the same long prompt densely and with Spotlight
# retrieval (top 2 % of cached tokens by 128-bit Hamming similarity). Runs on CPU (XLA references of the kernels)
# and on GPU (Pallas kernels). Cells are separated by `# %%`.

# %%
import os
import sys
import time

from spotlight_jax import RetrievalConfig, generate, load_hashes, load_model

HASHES = sys.argv[1] if len(sys.argv) > 1 else "runs/hash-smollm2-135m/hashes"
if not os.path.exists(HASHES):
    raise SystemExit(f"no hash checkpoint at {HASHES}: run `python -m spotlight_jax.train` first (about 10 min on CPU)")

model, tokenizer = load_model()
hashes = load_hashes(HASHES, model.cfg)
print(f"{len(hashes.layers)} hashed layers, {hashes.bits}-bit codes")

# %% A long prompt: some of the standard library's source, then a question about it.
import textwrap  # noqa: E402

source = open(textwrap.__file__).read()[:6000]
prompt = source + "\n\n# Summary: the function `dedent` in this module"
n = len(tokenizer.encode(prompt))
print(f"prompt: {n} tokens; Spotlight reads max(20, 2 % of the context) = {max(20, -(-n * 2 // 100))} per step")

# %%
methods = {
    "dense": (RetrievalConfig(method="dense"), None),
    "spotlight": (RetrievalConfig(method="spotlight", bits=hashes.bits), hashes),
    # Also always keep the first 4 tokens (attention sinks): +12.7 % perplexity instead of +33 % (docs/results.md).
    "spotlight+sink4": (RetrievalConfig(method="spotlight", bits=hashes.bits, sink_tokens=4), hashes),
    "oracle": (RetrievalConfig(method="oracle"), None),
}
outputs = {}
for name, (rcfg, h) in methods.items():
    t0 = time.perf_counter()
    out = generate(model, [prompt], tokenizer=tokenizer, max_new_tokens=48, retrieval_cfg=rcfg, hashes=h)
    outputs[name] = out
    print(f"--- {name} ({time.perf_counter() - t0:.1f} s incl. compilation)\n{out.text[0]!r}")

# %% How many generated tokens agree with dense decoding?
dense = outputs["dense"].tokens[0]
for name, out in outputs.items():
    same = (out.tokens[0] == dense).mean()
    print(f"{name:10s} {100 * same:5.1f} % of tokens identical to dense")
