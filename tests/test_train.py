"""Training loop on synthetic activations: loss goes down, orbax resume is exact, NaN stops the run, CLI parses."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from spotlight_jax.activations import ArrayActivations, synthetic_activations
from spotlight_jax.config import ModelConfig
from spotlight_jax.hashing import load_hashes
from spotlight_jax.train import NonFiniteLossError, TrainConfig, build_parser, config_from_args, train

TINY = ModelConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
    name="tiny-test",
)  # fmt: skip
LAYERS = (2, 3)


def _cfg(out_dir, **kw):
    base = dict(
        out_dir=str(out_dir), steps_per_layer=12, bits=32, hidden=32, max_queries=16, max_other=32,
        min_query_position=8, checkpoint_every=4, log_every=3, seed=3,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def acts():
    return synthetic_activations(TINY, LAYERS, num_samples=3, seq_len=96, seed=0)


def _params(stack):
    return {i: jax.tree.leaves(jax.device_get(nnx.state(stack.for_layer(i)))) for i in stack.layers}


def test_train_lowers_loss_and_exports(tmp_path, acts):
    res = train(_cfg(tmp_path / "run", steps_per_layer=24), activations=acts, progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rows) == 48 and {r["layer"] for r in rows} == set(LAYERS)
    for layer in LAYERS:
        losses = [r["loss"] for r in rows if r["layer"] == layer]
        assert np.mean(losses[-6:]) < np.mean(losses[:3])
    loaded = load_hashes(res.export_path, TINY)
    for a, b in zip(_params(loaded).values(), _params(res.stack).values(), strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    meta = json.load(open(os.path.join(res.export_path, "hash_config.json")))
    assert meta["layers"] == list(LAYERS) and meta["bits"] == 32 and meta["steps_per_layer"] == 24


def test_resume_after_interrupt_matches_uninterrupted(tmp_path, acts):
    ref = train(_cfg(tmp_path / "ref"), activations=acts, progress=False)

    def interrupt(layer, step, _):
        if layer == 3 and step == 6:  # mid second layer, 2 steps after its last checkpoint (step 4)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path / "run"), activations=acts, on_step=interrupt, progress=False)
    assert not os.path.exists(tmp_path / "run" / "hashes")
    resumed = train(_cfg(tmp_path / "run"), activations=acts, progress=False)
    for a, b in zip(_params(ref.stack).values(), _params(resumed.stack).values(), strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-7)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["global_step"] for r in rows] == list(range(1, 25))  # no duplicated / missing steps after resume
    # resuming with other training settings is refused
    with pytest.raises(ValueError, match="other training settings"):
        train(_cfg(tmp_path / "run", lr=5e-4), activations=acts, progress=False)


def test_nan_stops_with_layer_and_step(tmp_path, acts):
    q3, k3 = acts._qk[3]
    q3 = q3.copy()
    q3[:, :, 50:60] = np.nan
    bad = ArrayActivations(TINY, {2: acts._qk[2], 3: (q3, k3)})
    with pytest.raises(NonFiniteLossError, match=r"layer 3, step \d+"):
        train(_cfg(tmp_path / "run"), activations=bad, progress=False)
    ckpts = sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit())
    assert ckpts and max(ckpts) >= 12  # layer 2 finished and its checkpoint survived


def test_bad_inputs(tmp_path, acts):
    with pytest.raises(ValueError, match="not in the activation cache"):
        train(_cfg(tmp_path / "a", layers=(1, 2)), activations=acts, progress=False)
    with pytest.raises(ValueError, match="bits"):
        _cfg(tmp_path, bits=100)
    from spotlight_jax.activations import ActivationCacheError, ActivationReader

    with pytest.raises(ActivationCacheError, match="does not exist"):
        ActivationReader(tmp_path / "missing")


def test_cli_parsing(tmp_path):
    p = build_parser()
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--help"])
    assert e.value.code == 0
    cfg = config_from_args(p.parse_args(["--steps-per-layer", "7", "--layers", "2", "3", "--no-residual"]))
    assert cfg.steps_per_layer == 7 and cfg.layers == (2, 3) and cfg.residual is False
    cfg = config_from_args(p.parse_args(["--layers", "2,3", "--dataset", "x.jsonl", "--batch-size", "2"]))  # old forms
    assert cfg.layers == (2, 3) and cfg.dataset == "x.jsonl" and cfg.batch_size == 2
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"_comment": "x", "bits": 64, "num_samples": 5}))
    cfg = config_from_args(p.parse_args(["--config", str(path), "--num-samples", "9"]))
    assert cfg.bits == 64 and cfg.num_samples == 9
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("smollm2-135m", "llama3-8b", "qwen2.5-7b"):
        TrainConfig.from_json(os.path.join(repo, "configs", f"{name}.json"))
    assert TrainConfig.from_json(os.path.join(repo, "configs", "smollm2-135m.json")) == TrainConfig()


def test_activation_cache_from_token_file_is_reused(tmp_path):
    """A cache collected from a pre-tokenised .npz is reused by the same command (no model needed the second time)
    and refused for another dataset."""
    from spotlight_jax.activations import ActivationCacheError
    from spotlight_jax.data import save_samples
    from spotlight_jax.model import CausalLM
    from spotlight_jax.train import prepare_activations

    npz = str(tmp_path / "train.npz")
    samples = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 32)).astype(np.int32)
    save_samples(npz, samples, {"source": "corpus.jsonl", "part": "train"})
    cfg = _cfg(tmp_path / "run", dataset=npz, seq_len=32, num_samples=2, activations_dir=str(tmp_path / "acts"))
    first = prepare_activations(cfg, model=CausalLM(TINY, rngs=nnx.Rngs(0)), tokenizer=object(), progress=False)
    again = prepare_activations(cfg, progress=False)  # reused: would fail to load a model named by cfg.model
    np.testing.assert_array_equal(np.asarray(first.get(2, [0, 1])[0]), np.asarray(again.get(2, [0, 1])[0]))
    other = _cfg(tmp_path / "run", dataset=str(tmp_path / "other.npz"), seq_len=32, num_samples=2,
                 activations_dir=str(tmp_path / "acts"))  # fmt: skip
    with pytest.raises(ActivationCacheError, match="does not match"):
        prepare_activations(other, progress=False)


def test_resume_of_a_run_made_before_a_new_field_keeps_its_value(tmp_path, acts):
    """A run whose run_config predates top_weight_power trained with 0 (uniform tops): resuming it with another value
    (1) is refused instead of mixing the two objectives; 0 resumes it."""
    train(_cfg(tmp_path / "run", steps_per_layer=4, top_weight_power=0.0), activations=acts, progress=False)
    path = tmp_path / "run" / "run_config.json"
    saved = json.loads(path.read_text())
    del saved["training"]["top_weight_power"]
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="top_weight_power: 0.0 -> 1.0"):
        train(_cfg(tmp_path / "run", steps_per_layer=4, top_weight_power=1.0), activations=acts, progress=False)
    train(_cfg(tmp_path / "run", steps_per_layer=4, top_weight_power=0.0), activations=acts, progress=False)
