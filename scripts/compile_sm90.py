"""Compile a Pallas Triton kernel for sm_90 on a machine without a GPU and print its resources.

Lowers the kernel for CUDA on the CPU (its Triton IR), compiles that with the local ``triton`` package for an H100
(sm_90) and prints registers, stack (spills), shared memory and a few SASS instruction counts, via ``cuobjdump``
from triton's bundled CUDA tools. A check of what ptxas makes of a kernel before a GPU is at hand; not a timing.

    python scripts/compile_sm90.py topk B:K:N:S [--one-launch]
    python scripts/compile_sm90.py prologue B:N:K:H:BITS:LAYERS [--no-hash]      (e.g. 27:14:2:128:128:2)
    python scripts/compile_sm90.py attention B:N:K:S:H[:BT] --num-warps 4         (sparse attention + its merge)

Needs ``pip install triton`` (3.x with the NVIDIA backend); nothing runs on a GPU.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess

os.environ["SPOTLIGHT_PALLAS_INTERPRET"] = "0"  # lower the real kernels, not their interpret-mode emulation

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax._src.pallas.triton import lowering as triton_lowering  # noqa: E402
from jax._src.pallas.triton import pallas_call_registration as registration  # noqa: E402

MODULES: list[str] = []


def _capture(*args, **kwargs):
    res = _original(*args, **kwargs)
    MODULES.append(res.module.operation.get_asm(enable_debug_info=False))
    return res


_original = triton_lowering.lower_jaxpr_to_triton_module
registration.lowering.lower_jaxpr_to_triton_module = _capture


def _lower_topk(spec: str, one_launch: bool) -> None:
    from pallas_kernels.hamming_topk import hamming_topk_rows_stats

    b, kv, n, s = map(int, spec.split(":"))
    S = jax.ShapeDtypeStruct
    args = (S((b, n, 4), jnp.uint32), S((b, kv, s, 4), jnp.uint32), S((b,), jnp.int32), S((b,), jnp.int32))
    fn = lambda q, c, ln, bu: hamming_topk_rows_stats(q, c, ln, bu, k=max(1, int(0.02 * s)), one_launch=one_launch)
    jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def _lower_prologue(spec: str, hashed: bool) -> None:
    from pallas_kernels.decode_prologue import decode_prologue
    from pallas_kernels.hash_mlp import HashMLP

    b, n, kv, h, bits, layers = map(int, spec.split(":"))
    S, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    dims = (h,) + (128,) * (layers - 1) + (bits,)
    pairs = list(zip(dims[:-1], dims[1:], strict=True))
    mlp = HashMLP(tuple(S((kv, a, c), jnp.float32) for a, c in pairs), tuple(S((kv, c), jnp.float32) for _, c in pairs))
    s = 131072
    args = (
        S((b, n, h), bf), S((b, kv, h), bf), S((b, kv, h), bf), S((b, h), jnp.float32), S((b, h), jnp.float32),
        S((b,), jnp.int32), S((b, kv, s, h), bf), S((b, kv, s, h), bf),
        S((b, kv, s, bits // 32), jnp.uint32) if hashed else None, mlp if hashed else None,
    )  # fmt: skip
    jax.jit(lambda *a: decode_prologue(*a, implementation="pallas")).trace(*args).lower(lowering_platforms=("cuda",))


def _lower_attention(spec: str) -> None:
    from pallas_kernels.sparse_decode_attention import sparse_decode_attention_rows

    b, n, kv, s, h, *bt = map(int, spec.split(":"))
    k = max(1, int(0.02 * s))
    S, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    q, cache, idx, count = S((b, n, h), bf), S((b, kv, s, h), bf), S((b * kv, k), jnp.int32), S((b * kv,), jnp.int32)
    args = (q, cache, cache, idx, count)
    fn = functools.partial(sparse_decode_attention_rows, block_t=bt[0] if bt else 32)
    jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def _count(opcode: str, sass: str) -> int:
    return len(re.findall(r"\b" + opcode + r"\b", sass))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kernel", choices=["topk", "prologue", "attention"])
    p.add_argument("shape")
    p.add_argument("--one-launch", action="store_true", help="topk: the one-launch kernel")
    p.add_argument("--no-hash", action="store_true", help="prologue: RoPE + K / V writes only")
    p.add_argument(
        "--num-warps", type=int, default=8, help="warps of the compiled kernel (top-k / prologue: 8, attention: 4)"
    )
    p.add_argument("--num-stages", type=int, default=2, help="software pipelining stages (the kernels ask for 2)")
    args = p.parse_args()
    if args.kernel == "topk":
        _lower_topk(args.shape, args.one_launch)
    elif args.kernel == "attention":
        _lower_attention(args.shape)
    else:
        _lower_prologue(args.shape, not args.no_hash)

    import triton
    from triton.backends.compiler import GPUTarget

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    warps = args.num_warps
    for i, module in enumerate(MODULES):
        name = re.search(r"tt.func public @(\w+)", module).group(1)
        path = f"/tmp/compile_sm90_{i}.ttir"
        with open(path, "w") as f:
            f.write(module)
        compiled = triton.compile(
            path, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": args.num_stages}
        )
        with open(path + ".cubin", "wb") as f:
            f.write(compiled.asm["cubin"])
        res = subprocess.run([cuobjdump, "-res-usage", path + ".cubin"], capture_output=True, text=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", path + ".cubin"], capture_output=True, text=True).stdout
        usage = " ".join(re.findall(r"REG:\d+|STACK:\d+|SHARED:\d+|LOCAL:\d+", res))
        counts = " ".join(f"{op} {_count(op, sass)}" for op in ("HMMA", "FFMA", "POPC", "LDG", "STG"))
        print(f"{name} ({warps} warps): {usage}; SASS {counts}")


if __name__ == "__main__":
    main()
