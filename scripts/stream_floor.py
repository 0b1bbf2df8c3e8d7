"""What one streaming pass over the key codes costs on this GPU: the floor under the top-k's pass 1.

Device time (profiler) per call, over 8 rotating inputs (no L2 reuse), of (a) XLA's popcount-sum reduction of the
codes (one fusion, reads every byte once, writes [B, K]), (b) our pass 1 alone (scores only: `hamming_scores`), and
(c) the full top-k, for the Qwen2.5-7B shape at b1 512K and b8 128K (33.6 / 67.1 MB of 128-bit codes).

    python scripts/stream_floor.py            (GPU; prints a table, writes $OUT/stream_floor.json if OUT is set)
"""

import json
import os

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.hamming_topk import hamming_scores, hamming_topk
from spotlight_jax.bench.common import profile_kernels

SHAPES = [(1, 524288), (8, 131072)]  # (batch, S); 4 KV / 28 query heads, W = 4


def per_call(fn, args, label):
    calls = len(args)

    def run():
        return jax.block_until_ready([fn(*a) for a in args])

    run()
    res = profile_kernels(run, label, per=calls)
    return res[0] if res else float("nan")


def main():
    rows = []
    for b, s in SHAPES:
        keys = jax.random.split(jax.random.key(0), 8)
        args = [
            (jax.random.bits(k, (b, 28, 4), jnp.uint32), jax.random.bits(k, (b, 4, s, 4), jnp.uint32)) for k in keys
        ]
        nbytes = b * 4 * s * 16
        xla = jax.jit(lambda q, c: jnp.sum(lax.population_count(c ^ q[:, :4, None, :]).astype(jnp.int32), axis=(2, 3)))
        ours = jax.jit(lambda q, c: hamming_scores(q, c, implementation="pallas"))
        lengths, k = jnp.full((b,), s, jnp.int32), int(0.02 * s)
        topk = jax.jit(lambda q, c, ln=lengths, k=k: hamming_topk(q, c, ln, k, implementation="pallas").indices)
        row = {"batch": b, "S": s, "codes_MB": round(nbytes / 1e6, 1)}
        for name, fn in (("xla_popcount_sum", xla), ("pass1_scores_only", ours), ("topk", topk)):
            us = per_call(fn, args, f"{name} b{b} {s}")
            row[f"{name}_us"] = round(us, 2)
            row[f"{name}_TBs"] = round(nbytes / us / 1e6, 2)
        rows.append(row)
        print(row, flush=True)
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    print(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "stream_floor.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
