"""The benchmark CLIs' pure parts: variant specs, roofline bytes, method modifiers, profile arithmetic, the timing
harness's call chaining (no timing is asserted)."""

import jax.numpy as jnp
import pytest

from spotlight_jax.bench import kernels
from spotlight_jax.bench.common import busy_and_span, kernel_categories
from spotlight_jax.bench.generate import add_speedups, kv_bytes_per_token, method_fields, step_roofline_bytes
from spotlight_jax.bench.kernels import _attention_variant, _topk_variant, _variant_name
from spotlight_jax.config import ModelConfig, RetrievalConfig


def test_topk_variant_specs():
    assert _topk_variant("512:32:4") == {"block_s": 512, "num_thresholds": 32, "num_warps": 4}
    assert _topk_variant("1024:32:8:0")["csa"] is False
    assert _topk_variant("1024:32:8:f4")["csa_full_adders"] == 4
    kw = _topk_variant("mb=128,P=1056,d=2,csa=0")
    assert kw == {
        "block_s": 1024, "num_thresholds": 32, "num_warps": 8, "max_blocks": 128, "target_programs": 1056, "depth": 2,
        "csa": False,
    }  # fmt: skip
    assert _variant_name(kw) == "bs=1024,T=32,w=8,mb=128,P=1056,d=2,csa=0"
    assert _topk_variant("one=1")["one_launch"] is True
    with pytest.raises(ValueError, match="unknown top-k variant key 'x'"):
        _topk_variant("x=1")


def test_attention_variant_specs():
    assert _attention_variant("bt=64,w=8,st=3,hb=32") == dict(block_t=64, num_warps=8, num_stages=3, merge_block_h=32)
    for bad in ("x=1", "bt", "bt=a"):
        with pytest.raises(ValueError, match="bad attention variant item"):
            _attention_variant(bad)


def test_roofline_bytes_split_over_tensor_parallel_devices():
    cfg = ModelConfig.preset("qwen2.5-7b")
    ctx, batch, wbytes = 131072, 4, 10**9
    dense1, parts = step_roofline_bytes(cfg, "dense", batch, ctx, wbytes, RetrievalConfig())
    assert dense1 == wbytes + batch * ctx * kv_bytes_per_token(cfg)
    dense2, _ = step_roofline_bytes(cfg, "dense", batch, ctx, wbytes, RetrievalConfig(), tp=2)
    assert dense2 - wbytes == (dense1 - wbytes) // 2
    rcfg = RetrievalConfig(method="spotlight")
    sparse, parts = step_roofline_bytes(cfg, "spotlight", batch, ctx, wbytes, rcfg)
    codes = batch * (cfg.num_layers - 2) * cfg.num_kv_heads * ctx * 16  # 128-bit codes of every sparse layer
    assert parts["codes_read_GB"] == pytest.approx(codes / 1e9)
    assert wbytes + codes < sparse < dense1 / 4  # dense layers' KV + codes + selected rows: far below dense


def test_method_modifiers():
    assert method_fields("spotlight+sink4") == {"method": "spotlight", "sink_tokens": 4}
    assert method_fields("spotlight+1launch") == {"method": "spotlight", "topk_one_launch": True}
    assert method_fields("spotlight+3launch+sink2")["topk_one_launch"] is False
    assert method_fields("dense+prologue") == {"method": "dense", "fused_prologue": True}  # dense layers fuse too
    assert method_fields("spotlight+prologue+1launch")["fused_prologue"] is True
    assert method_fields("dense+noprologue") == {"method": "dense", "fused_prologue": False}  # the default is fused
    with pytest.raises(ValueError):
        method_fields("dense+1launch")
    with pytest.raises(ValueError):
        method_fields("spotlight+sideways3")


def test_busy_and_span_counts_overlap_once():
    assert busy_and_span([(0, 10), (5, 15), (20, 30)]) == (25.0, 30)
    assert busy_and_span([]) == (0.0, 0.0)


def test_timing_chains_a_carry_through_the_calls():
    """`_median_call_us(carry=...)` threads the carry (caches updated in place) through one jit's calls in order."""
    seen = []

    def fn(c, x):
        seen.append(None)  # traced once per call site
        return x * 2, c + x

    sets = [(jnp.full((4,), float(i)),) for i in range(3)]
    us = kernels._median_call_us(fn, sets, reps=1, min_calls=6, carry=jnp.zeros(4))
    assert isinstance(us, float) and len(seen) == 3 + 6  # the n-call jit and the 2n-call jit, each traced once


def test_chained_carry_copy_is_not_device_time():
    """The profiled jit's one copy of the carry (MemcpyD2D) is the harness's, not the op's (H100: 810 us of a
    B27 cache copy vs a 10 us prologue kernel)."""
    total, per_kernel = kernels._without_carry_copy(820.5, {"MemcpyD2D": 810.0, "decode_prologue": 10.5})
    assert total == pytest.approx(10.5) and per_kernel == {"decode_prologue": 10.5}
    assert kernels._without_carry_copy(5.0, {"k": 5.0}) == (5.0, {"k": 5.0})


def test_kernels_table_has_a_row_per_configuration():
    """`bench kernels` writes one table row per (shape, batch, length): wall (device) [target], and cuDNN's time over
    top-k + attention's."""
    cfg = dict(model="qwen2.5-7b", batch=8, length=131072)
    results = [
        dict(op="topk_pallas(bs=1024,T=32,w=8)", us=60.8, device_us=45.3, target_us=33.5, **cfg),
        dict(op="spotlight_pallas(topk+attention)", us=92.8, device_us=70.1, **cfg),
        dict(op="dense_cudnn", us=719.1, device_us=698.3, **cfg),
        dict(op="attention_pallas", us=9.0, target_us=8.0, **{**cfg, "length": 32768}),
    ]
    lines = kernels.markdown_table({"device": "gpu:H100", "jax": "0.11.2", "date": "d"}, results).splitlines()
    rows = [line for line in lines if line.startswith("| qwen")]
    assert len(rows) == 2 and "| 128K |" in rows[0] and "| 32K |" in rows[1]
    assert "60.8 (45.3) [33.5]" in rows[0] and rows[0].endswith("| 7.7× (10.0×) |")
    assert "9.0 [8.0]" in rows[1]


def test_unknown_model_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model shape 'gpt-5'.*llama3-8b"):
        kernels.run(kernels.KernelsConfig(model=("gpt-5",)))
    assert kernels.MODELS["llama3-8b"] == (32, 8, 128)  # named as ModelConfig.preset names it


def test_kernel_categories_of_a_decode_step():
    """Names from a real TP decode-step profile (`gen_tp2_triton.log`) land in their categories; the rest is other."""
    cats = kernel_categories({
        "hamming_topk_one_launch": 65.0, "hamming_refine_0": 1.0, "sparse_decode_attention": 25.0,
        "sparse_decode_attention_merge": 2.0, "decode_attention": 800.0, "decode_attention_merge": 3.0,
        "gemm_fusion_dot_476": 40.0, "all_reduce_22_0_fusion_1": 8.0, "decode_prologue": 4.0,
        "loop_reduce_fusion_55": 2.0, "input_scatter_fusion_56": 1.5, "pack_bits": 1.0,
    })  # fmt: skip
    assert cats == {
        "topk": 66.0, "sparse_attention": 27.0, "dense_attention": 803.0, "prologue": 4.0, "collectives": 8.0,
        "gemm": 40.0, "other": 4.5,
    }  # fmt: skip


def test_speedups_are_against_the_fastest_dense_of_the_batch():
    rows = [
        {"method": "dense", "batch": 4, "tokens_per_s": 100.0},
        {"method": "dense+prologue", "batch": 4, "tokens_per_s": 110.0},
        {"method": "spotlight+prologue", "batch": 4, "tokens_per_s": 330.0},
        {"method": "dense", "batch": 1, "tokens_per_s": 50.0},
        {"method": "spotlight", "batch": 1, "tokens_per_s": 60.0},
        {"method": "spotlight", "batch": 8, "tokens_per_s": 60.0},  # no dense row at this batch
    ]
    add_speedups(rows)
    assert (rows[2]["speedup_vs_dense"], rows[2]["vs"]) == (3.0, "dense+prologue")
    assert rows[4]["speedup_vs_dense"] == 1.2 and "vs" not in rows[4]
    assert "speedup_vs_dense" not in rows[5] and "speedup_vs_dense" not in rows[1]
