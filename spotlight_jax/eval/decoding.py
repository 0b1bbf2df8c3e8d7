"""Shared plumbing of the decode-path evaluations (perplexity, passkey, fidelity).

Every evaluation here runs the model through the same code generate() uses: a chunked dense prefill that fills the
KV and key-code caches, then decode steps whose attention is chosen by a `RetrievalConfig` (kernels on the GPU, their
XLA references on the CPU). Nothing imitates the selection with a dense mask.

Methods are named `dense`, `oracle`, `quest`, `linear-<bits>` (a seeded LinearHash) and `spotlight` (the trained
checkpoint given with --hashes; reported as `spotlight-<bits>`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spotlight_jax.cli import method_fields, model_field, option, out_dir_field
from spotlight_jax.config import ModelConfig, PrefillConfig, RetrievalConfig
from spotlight_jax.generate import SamplingConfig, bucket, decode_loop
from spotlight_jax.model import KVCache, init_cache
from spotlight_jax.prefill import prefill
from spotlight_jax.retrieval import CODE_METHODS

DEFAULT_METHODS = ("dense", "oracle", "linear-128", "linear-1024", "spotlight")
PYDOCS = Path(__file__).resolve().parents[3] / "shared" / "data" / "pydocs.jsonl.gz"
EVAL_METHODS = ("dense", "oracle", "quest", "linear", "spotlight")
UNKNOWN_METHOD = "unknown method {!r}: use dense, oracle, quest, linear-<bits> or spotlight"
NEEDS_HASHES = "method 'spotlight' needs hashes (--hashes PATH: an export of `python -m spotlight_jax.train`)"
METHODS_HELP = (
    "dense oracle quest linear-<bits> spotlight; +sink<N> / +recent<N> keep first / last rows, +keep<P> keeps P %% of "
    "the rows (e.g. oracle+keep5), +rerank<R> rescores R x the budget of Hamming candidates exactly "
    "(spotlight+rerank4), +mass<P> keeps the fewest rows holding attention mass P (oracle+mass0.9)"
)


def default_data() -> str:
    """The pydocs corpus beside the checkout when present (this project's machines), else the stdlib sources."""
    return str(PYDOCS) if PYDOCS.exists() else "stdlib"


@dataclasses.dataclass(frozen=True)
class DecodeEvalConfig:
    """What every decode-path evaluation takes (perplexity, passkey, fidelity extend it)."""

    model: str | None = model_field()
    hashes: str | None = option(
        None, "exported Spotlight hash checkpoint (needed by method 'spotlight'; default: none)"
    )
    methods: tuple[str, ...] = option(DEFAULT_METHODS, METHODS_HELP)
    data: str | None = option(None, "datasets source (default: pydocs if present, else stdlib)")
    tokens: str | None = option(None, "prebuilt token file (.npz) from --save-tokens: skips tokenising (default: none)")
    save_tokens: str | None = option(None, "write the tokenised evaluation set here (.npz) and go on (default: no)")
    keep_ratio: float = option(0.02, "share of the cached rows a sparse method keeps")
    min_keep: int = option(20, "fewest rows a sparse method keeps")
    dense_layers: tuple[int, ...] = option((0, 1), "layers that stay dense", type=int, nargs="*")
    implementation: str | None = option(
        None, "decode kernels (default: pallas on the GPU, xla elsewhere)", choices=("xla", "pallas")
    )
    seed: int = option(0, "seed of the linear hashes and of the sample order")
    out_dir: str | None = out_dir_field("eval")

    def check(self) -> None:
        """What can be checked before the model loads: method specs, the hashes they need, the token file."""
        for spec in self.methods:
            kind = method_fields(spec)["method"].partition("-")[0]  # a bad modifier raises the parser's ValueError
            if kind not in EVAL_METHODS:
                raise ValueError(UNKNOWN_METHOD.format(spec))
            if kind == "spotlight" and not self.hashes:
                raise ValueError(NEEDS_HASHES)
        if self.hashes and not os.path.isdir(self.hashes):
            raise FileNotFoundError(f"hash checkpoint folder not found: {self.hashes}")
        if self.tokens and not os.path.isfile(self.tokens):
            raise FileNotFoundError(f"token file not found: {self.tokens}")


def method_setup(name: str, cfg: ModelConfig, ecfg: DecodeEvalConfig) -> tuple[str, RetrievalConfig, Any]:
    """'linear-256' -> (label, RetrievalConfig, HashStack | None).

    Modifiers after '+' (``config.split_method``) set RetrievalConfig fields of a sparse method: 'spotlight+sink4'
    keeps the first 4 tokens, 'oracle+recent16' the last 16, 'spotlight+sink4+recent16' both; 'oracle+keep5' keeps
    5 % of the rows instead of `keep_ratio`.
    """
    spec = name
    always_kept = method_fields(spec)  # a bad spec raises the parser's ValueError
    name = always_kept.pop("method")
    base = dict(
        keep_ratio=ecfg.keep_ratio, min_keep=ecfg.min_keep, dense_layers=tuple(ecfg.dense_layers),
        implementation=ecfg.implementation,
    )  # fmt: skip
    base.update(always_kept)  # the spec's modifiers (+sink4, +keep5, ...) override the configured defaults
    label, rcfg, stack = _method_base(name, cfg, ecfg, base)
    return label + spec[len(name) :], rcfg, stack


def _method_base(name: str, cfg: ModelConfig, ecfg: DecodeEvalConfig, base: dict) -> tuple[str, RetrievalConfig, Any]:
    from spotlight_jax.hashing import HashConfig, HashStack, load_hashes

    kind, _, bits = name.partition("-")
    if kind in ("dense", "oracle", "quest"):
        return name, RetrievalConfig(method=kind, **base), None
    if kind == "linear":
        bits = int(bits or 128)
        stack = HashStack(
            cfg, HashConfig(kind="linear", bits=bits), dense_layers=base["dense_layers"], rngs=nnx.Rngs(ecfg.seed)
        )
        return f"linear-{bits}", RetrievalConfig(method="linear", bits=bits, **base), stack
    if kind == "spotlight":
        if not ecfg.hashes:
            raise ValueError(NEEDS_HASHES)
        stack = load_hashes(ecfg.hashes, cfg)
        missing = [i for i in range(cfg.num_layers) if i not in base["dense_layers"] and i not in stack.layers]
        if missing:
            raise ValueError(
                f"the hashes have no hash module for layers {missing}; add them to dense_layers or retrain"
            )
        return f"spotlight-{stack.bits}", RetrievalConfig(method="spotlight", bits=stack.bits, **base), stack
    raise ValueError(UNKNOWN_METHOD.format(name))


def load_eval_model(ecfg: DecodeEvalConfig):
    from spotlight_jax.convert import load_model

    return load_model(ecfg.model)


def eval_texts(ecfg: DecodeEvalConfig, part: str = "heldout"):
    """Held-out documents of `data` (the same split the training uses, so no document is in both)."""
    from spotlight_jax.data import load_documents, split_documents

    ds = load_documents(ecfg.data or default_data())
    return ds.select(split_documents(len(ds), part))["text"]


def tokens_or_build(ecfg: DecodeEvalConfig, build) -> tuple[dict, str]:
    """(arrays, corpus label): the `tokens` file if given, else `build()` (a dict of arrays), saved to `save_tokens`
    when asked. The file carries the name of its corpus, so results computed from it on another machine still say
    where the text came from."""
    if ecfg.tokens:
        with np.load(ecfg.tokens) as f:
            arrays = {k: f[k] for k in f.files}
        source = arrays.pop("data_source", None)
        return arrays, (str(source) if source is not None else f"tokens file {os.path.basename(ecfg.tokens)}")
    arrays = build()
    label = ecfg.data or default_data()
    if ecfg.save_tokens:
        os.makedirs(os.path.dirname(os.path.abspath(ecfg.save_tokens)), exist_ok=True)
        np.savez_compressed(ecfg.save_tokens, **arrays, data_source=np.asarray(os.path.basename(label)))
    return arrays, label


# ---------------------------------------------------------------------------------------------------------------------
# Shared dense prefill, then each method decodes from its own copy of the cache.
#
# Prefill is dense for every method (DESIGN.md §1), so it runs once per prompt batch. A method that retrieves through
# codes gets its key-code cache from the prefilled keys with the same `key_codes` the prefill itself would apply,
# token by token: the decode steps that follow see exactly the caches generate() would have built.


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"), donate_argnames=("cache",))
def dense_prefill(graphdef, state, tokens, lengths, cache, *, chunk):
    """tokens [B, T] right-padded, lengths [B] -> (cache, logits [B, V] at each row's last prompt token), through
    generate()'s chunked prefill."""
    logits, cache = prefill(nnx.merge(graphdef, state), tokens, lengths, cache, chunk=chunk)
    return cache, logits


@functools.partial(jax.jit, static_argnames=("hash_graphdef", "retrieval_cfg"))
def with_codes(hash_graphdef, hash_state, cache: KVCache, *, retrieval_cfg: RetrievalConfig) -> KVCache:
    """The method's cache: the dense KV cache plus key codes on the layers that retrieve through codes."""
    if hash_graphdef is None or retrieval_cfg.method not in CODE_METHODS:
        return cache
    hashes = nnx.merge(hash_graphdef, hash_state)
    codes = tuple(
        hashes.for_layer(i).key_codes(k) if retrieval_cfg.is_sparse_layer(i) else None for i, k in enumerate(cache.k)
    )
    return KVCache(cache.k, cache.v, codes)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "hash_graphdef", "retrieval_cfg", "out_len"), donate_argnames=("cache",)
)
def greedy_decode(graphdef, state, hash_graphdef, hash_state, cache, logits, lengths, *, retrieval_cfg, out_len):
    """generate()'s decode loop (greedy, no EOS stop) from a prefilled cache -> tokens [B, out_len]."""
    model = nnx.merge(graphdef, state)
    hashes = nnx.merge(hash_graphdef, hash_state) if hash_graphdef is not None else None
    run = functools.partial(model, retrieval_cfg=retrieval_cfg, hashes=hashes, logits="last")
    tokens, _ = decode_loop(
        run, logits, cache, lengths, jnp.int32(out_len), jnp.array([-1], jnp.int32), jax.random.key(0),
        out_len=out_len, sampling=SamplingConfig(), pad_id=0,
    )  # fmt: skip
    return tokens


@functools.partial(
    jax.jit, static_argnames=("graphdef", "hash_graphdef", "retrieval_cfg", "prefix"), donate_argnames=("cache",)
)
def teacher_forced_nll(graphdef, state, hash_graphdef, hash_state, tokens, cache, *, retrieval_cfg, prefix):
    """tokens [B, L], cache prefilled with tokens[:, :prefix] -> NLL [B, L - 1 - prefix] of tokens[:, p + 1]
    predicted by the decode step at position p >= prefix: generate()'s per-step work with the true token fed back.
    """
    model = nnx.merge(graphdef, state)
    hashes = nnx.merge(hash_graphdef, hash_state) if hash_graphdef is not None else None
    b, length = tokens.shape
    run = functools.partial(model, retrieval_cfg=retrieval_cfg, hashes=hashes, logits="last")

    def step(cache, p):
        tok = jax.lax.dynamic_slice_in_dim(tokens, p, 1, axis=1)  # [B, 1]
        nxt = jax.lax.dynamic_index_in_dim(tokens, p + 1, axis=1, keepdims=False)  # [B]
        out = run(tok, positions=jnp.full((b, 1), p, jnp.int32), cache=cache, lengths=jnp.full((b,), p + 1, jnp.int32))
        logp = jax.nn.log_softmax(out.logits[:, 0], axis=-1)
        return out.cache, -jnp.take_along_axis(logp, nxt[:, None], axis=-1)[:, 0]

    _, nll = jax.lax.scan(step, cache, jnp.arange(prefix, length - 1))
    return nll.T


def prefill_batch(model, rows: list[list[int]] | np.ndarray, cache_len: int, chunk: int | None = None):
    """Right-pad `rows`, prefill densely in chunks (default `PrefillConfig`'s) into a cache of `cache_len` ->
    (cache, last logits, lengths)."""
    rows = [list(map(int, r)) for r in rows]
    lengths = np.array([len(r) for r in rows], np.int32)
    width = min(bucket(int(lengths.max())), cache_len)  # the bucket, but never wider than the cache
    tokens = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    graphdef, state = nnx.split(model)
    cache = init_cache(model.cfg, len(rows), cache_len, model.dtype)
    chunk = PrefillConfig(chunk=chunk).chunk_for(len(rows), width, cache_len, jax.default_backend())
    cache, logits = dense_prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), cache, chunk=chunk)
    return cache, logits, jnp.asarray(lengths)


def copy_cache(cache: KVCache) -> KVCache:
    """A private copy (decode donates its cache; the shared prefill must survive for the next method)."""
    return jax.tree.map(jnp.copy, cache)


def split_model(model, hashes):
    graphdef, state = nnx.split(model)
    hash_graphdef, hash_state = nnx.split(hashes) if hashes is not None else (None, None)
    return graphdef, state, hash_graphdef, hash_state
