"""Bad inputs and faults (issue 21): each is refused with one sentence naming what is wrong and what to do, and a
crash, a kill, a damaged checkpoint or a full disk loses nothing (a resumed run ends bit-identical to an
uninterrupted one). What is guaranteed is listed in docs/guarantees.md; each test below names the case it covers.

Tiny shapes throughout (4-layer model, 2 trained layers, 8 steps each): the module runs in about a minute on 2 cores.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spotlight_jax.activations import ActivationCacheError, collect_activations, synthetic_activations
from spotlight_jax.config import ModelConfig, RetrievalConfig
from spotlight_jax.hashing import HashCheckpointError, HashConfig, HashStack, export_hashes, load_hashes
from spotlight_jax.model import CausalLM
from spotlight_jax.train import TrainConfig, train

TINY = ModelConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
    max_position_embeddings=256, eos_token_ids=(2,), name="tiny-faults",
)  # fmt: skip
LAYERS = (2, 3)
TESTS = pathlib.Path(__file__).resolve().parent


def _cfg(out_dir, **kw) -> TrainConfig:
    # 8 steps a layer, checkpoints at global steps 3, 6, 8 (layer end), 11, 14, 16.
    base = dict(
        out_dir=str(out_dir), steps_per_layer=8, bits=32, hidden=32, max_queries=16, max_other=32,
        min_query_position=8, checkpoint_every=3, log_every=2, seed=3,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _acts():
    return synthetic_activations(TINY, LAYERS, num_samples=3, seq_len=64, seed=0)


@pytest.fixture(scope="module")
def acts():
    return _acts()


def _params(stack) -> list[np.ndarray]:
    return [np.asarray(x) for i in stack.layers for x in jax.tree.leaves(jax.device_get(nnx.state(stack.for_layer(i))))]


def _assert_same(a, b) -> None:
    for x, y in zip(_params(a), _params(b), strict=True):
        np.testing.assert_array_equal(x, y)  # bit-identical, not close


@pytest.fixture(scope="module")
def reference(acts, tmp_path_factory):
    """The uninterrupted run every resumed run must reproduce exactly."""
    return train(_cfg(tmp_path_factory.mktemp("ref") / "run"), activations=acts, progress=False)


def _interrupt_at(layer: int, step: int):
    def hook(lay, s, _):
        if (lay, s) == (layer, step):
            raise KeyboardInterrupt

    return hook


def _steps(run) -> list[int]:
    return sorted(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit())


# ----------------------------------------------------------------------------------------------------------------
# Run provenance: a run, its activation cache and its export record the model and data they came from.


def _model_dir(path, seed: int) -> str:
    from spotlight_jax.checkpoint import save_model

    return save_model(CausalLM(TINY, rngs=nnx.Rngs(seed)), path)


def _token_file(path, seed: int) -> str:
    from spotlight_jax.data import save_samples

    samples = np.random.default_rng(seed).integers(3, TINY.vocab_size, (3, 64)).astype(np.int32)
    save_samples(str(path), samples, {"source": "corpus.jsonl", "part": "train"})
    return str(path)


def test_resume_with_another_model_or_dataset_is_refused(tmp_path):
    """Resuming an out-dir with another --model / dataset, or training on another model's --activations-dir."""
    model_a, model_b = _model_dir(tmp_path / "model-a", 0), _model_dir(tmp_path / "model-b", 1)
    data = _token_file(tmp_path / "d1.npz", 0)
    run = tmp_path / "run"
    kw = dict(seq_len=64, num_samples=3, steps_per_layer=2, checkpoint_every=1, dataset=data)
    train(_cfg(run, model=model_a, **kw), progress=False)
    meta = json.loads((run / "hashes" / "hash_config.json").read_text())
    assert meta["provenance"]["model_source"]["model"] == os.path.realpath(model_a)
    assert meta["provenance"]["model_weights_sha256"]

    with pytest.raises(ValueError, match=r"model: run .*model-a.* vs asked .*model-b"):
        train(_cfg(run, model=model_b, **kw), progress=False)
    with pytest.raises(ValueError, match=r"dataset: run 'd1.npz' vs asked 'd2.npz'"):
        train(_cfg(run, model=model_a, **{**kw, "dataset": _token_file(tmp_path / "d2.npz", 1)}), progress=False)
    with pytest.raises(ActivationCacheError, match=r"model: cache .*model-a.* vs asked .*model-b"):
        acts_a = str(run / "activations")
        train(_cfg(tmp_path / "run2", model=model_b, activations_dir=acts_a, **kw), progress=False)
    # Same file name, other tokens, cache deleted: the names agree, the recorded token fingerprint does not.
    _token_file(tmp_path / "d1.npz", 2)
    shutil.rmtree(run / "activations")
    with pytest.raises(ValueError, match="tokens_sha256"):
        train(_cfg(run, model=model_a, **kw), progress=False)
    # The same model moved elsewhere is the same model (its files' fingerprint), and the run resumes. (The cache
    # collected from the other tokens above holds them still: it goes, the original tokens come back.)
    _token_file(tmp_path / "d1.npz", 0)
    shutil.rmtree(run / "activations")
    moved = shutil.move(model_a, tmp_path / "moved-a")
    train(_cfg(run, model=str(moved), **kw), progress=False)


def test_partial_cache_of_other_weights_is_refused(tmp_path):
    """Resuming an interrupted activation collection with a model of the same shape but other weights."""
    samples = np.random.default_rng(0).integers(0, 256, (3, 32)).astype(np.int32)
    collect_activations(CausalLM(TINY, rngs=nnx.Rngs(0)), samples, tmp_path / "a", LAYERS, progress=False)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    (tmp_path / "a" / "manifest.json").write_text(json.dumps({**manifest, "completed": 1}))  # as if interrupted
    with pytest.raises(ActivationCacheError, match="model_weights_sha256"):
        collect_activations(CausalLM(TINY, rngs=nnx.Rngs(1)), samples, tmp_path / "a", LAYERS, progress=False)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint integrity.


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, acts, reference, damage):
    """64 flipped bytes / truncated files in the latest checkpoint: a one-line warning, the step is moved aside
    (not deleted), the one before it is restored, and the run ends bit-identical."""
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(run), activations=acts, on_step=_interrupt_at(3, 4), progress=False)
    assert _steps(run) == [8, 11]
    files = [p for p in (run / "checkpoints" / "11").rglob("*") if p.is_file() and p.stat().st_size > 256]
    for p in files if damage == "truncate" else [max(files, key=lambda p: p.stat().st_size)]:
        blob = bytearray(p.read_bytes())
        if damage == "flip":
            mid = len(blob) // 2
            blob[mid : mid + 64] = bytes(b ^ 0xFF for b in blob[mid : mid + 64])
        p.write_bytes(bytes(blob) if damage == "flip" else bytes(blob[: len(blob) // 3]))
    with pytest.warns(UserWarning, match=r"checkpoint step 11 .* is damaged") as caught:
        resumed = train(_cfg(run), activations=acts, progress=False)
    (warning,) = [w for w in caught if w.category.__name__ == "CheckpointWarning"]
    assert "\n" not in str(warning.message)
    assert [p.name.split("-")[0] for p in (run / "damaged_checkpoints").iterdir()] == ["11"]
    _assert_same(resumed.stack, reference.stack)


def test_non_finite_checkpoint_is_rejected_at_restore(tmp_path, acts, reference, monkeypatch):
    """A checkpoint whose values read back as NaN is not resumed from: the previous one is."""
    import orbax.checkpoint as ocp

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(run), activations=acts, on_step=_interrupt_at(3, 4), progress=False)
    real = ocp.CheckpointManager.restore
    poisoned = {"n": 0}

    def restore(self, step, *a, **kw):
        out = real(self, step, *a, **kw)
        if poisoned["n"] == 0:
            poisoned["n"] += 1
            out["hashes"] = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan) if x.dtype == jnp.float32 else x,
                                         out["hashes"])  # fmt: skip
        return out

    monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
    with pytest.warns(UserWarning, match=r"step 11 .*NaN or inf"):
        resumed = train(_cfg(run), activations=acts, progress=False)
    _assert_same(resumed.stack, reference.stack)


def test_non_finite_parameters_are_not_exported_or_loaded(tmp_path):
    stack = HashStack(TINY, HashConfig(bits=32, hidden=32), layers=LAYERS, rngs=nnx.Rngs(0))
    good = export_hashes(tmp_path / "h", stack)
    module = stack.for_layer(3)
    module.key_mlp.weights[0][...] = module.key_mlp.weights[0][...].at[0, 0, 0].set(jnp.inf)
    with pytest.raises(HashCheckpointError, match=r"not exporting .*layer_003.*NaN or inf"):
        export_hashes(tmp_path / "h", stack)
    load_hashes(good, TINY)  # the earlier export is untouched
    # An export whose params were replaced behind its back (no checksums to catch it): refused on load.
    import orbax.checkpoint as ocp

    from spotlight_jax.hashing import _pure_params

    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    shutil.rmtree(bad / "params")
    (bad / "spotlight_sha256.json").unlink()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(bad / "params", jax.device_get(_pure_params(stack)))
    with pytest.raises(HashCheckpointError, match="NaN or inf"):
        load_hashes(bad, TINY)


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes: hash exports and model checkpoints.


def test_interrupted_reexport_leaves_the_previous_export_whole(tmp_path, monkeypatch):
    """A re-export (32-bit) that fails after writing its params keeps the earlier (64-bit) export loadable."""
    from spotlight_jax import hashing

    old = HashStack(TINY, HashConfig(bits=64, hidden=32), layers=LAYERS, rngs=nnx.Rngs(0))
    new = HashStack(TINY, HashConfig(bits=32, hidden=32), layers=LAYERS, rngs=nnx.Rngs(1))
    path = export_hashes(tmp_path / "h", old)
    real_dump = hashing.json.dump

    def dump(obj, f, *a, **kw):  # the config JSON is written after the params
        if obj.get("bits") == 32:
            raise RuntimeError("injected crash")
        return real_dump(obj, f, *a, **kw)

    monkeypatch.setattr(hashing.json, "dump", dump)
    with pytest.raises(RuntimeError, match="injected"):
        export_hashes(path, new)
    monkeypatch.setattr(hashing.json, "dump", real_dump)
    loaded = load_hashes(path, TINY, bits=64)
    _assert_same(loaded, old)
    assert sorted(os.listdir(tmp_path)) == ["h"]  # no temporary folder left behind
    # A folder mixing one export's params with another's config is refused, naming the mismatch.
    other = export_hashes(tmp_path / "h32", new)
    shutil.rmtree(pathlib.Path(path) / "params")
    shutil.copytree(pathlib.Path(other) / "params", pathlib.Path(path) / "params")
    with pytest.raises(HashCheckpointError, match="damaged"):
        load_hashes(path, TINY)
    (pathlib.Path(path) / "spotlight_sha256.json").unlink()  # without checksums the shapes still tell
    with pytest.raises(HashCheckpointError, match="do not match|do not have the shapes"):
        load_hashes(path, TINY)


def test_export_refuses_a_folder_that_is_not_an_export(tmp_path, acts):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    stack = HashStack(TINY, HashConfig(bits=32, hidden=32), layers=LAYERS, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not a hash export: refusing to replace it"):
        export_hashes(user, stack)
    with pytest.raises(ValueError, match="holds other files"):  # checked before training starts
        train(_cfg(tmp_path / "run", export_dir=str(user)), activations=acts, progress=False)
    assert (user / "notes.txt").read_text() == "keep me" and not (tmp_path / "run" / "checkpoints").exists()


def test_save_model_overwrite_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    from spotlight_jax.checkpoint import restore_model, save_model

    model = CausalLM(TINY, rngs=nnx.Rngs(0))
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="not a spotlight_jax model checkpoint: refusing to replace it"):
        save_model(model, user, overwrite=True)
    assert (user / "thesis.tex").read_text() == "years of work"
    path = save_model(model, tmp_path / "ckpt")
    save_model(CausalLM(TINY, rngs=nnx.Rngs(1)), path, overwrite=True)  # an earlier checkpoint of ours is replaced
    assert not np.array_equal(np.asarray(restore_model(path).embed.embedding[...]), model.embed.embedding[...])
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "mine"]


# ----------------------------------------------------------------------------------------------------------------
# Kills: a subprocess SIGKILLs itself at a chosen moment; the resumed run is bit-identical.


def _killed_run(mode: str, out_dir: str, export_dir: str | None = None, bits: int = 32) -> None:
    """Runs in a subprocess (`python -c`): train, and SIGKILL this process at the moment `mode` names."""
    import orbax.checkpoint as ocp

    from spotlight_jax import hashing

    def die(*_, **__):
        os.kill(os.getpid(), signal.SIGKILL)

    on_step = None
    if mode == "step":  # between two optimizer steps, 1 step after a checkpoint
        on_step = lambda layer, s, _: die() if (layer, s) == (3, 4) else None  # noqa: E731
    elif mode == "save":  # while orbax is writing checkpoint 11 (its save is asynchronous)
        real = ocp.CheckpointManager.save

        def save(self, step, *a, **kw):
            out = real(self, step, *a, **kw)
            if step == 11:
                die()
            return out

        ocp.CheckpointManager.save = save
    elif mode == "export":  # after the export's params are written, before its config
        hashing.json.dump = die
    train(_cfg(out_dir, export_dir=export_dir, bits=bits), activations=_acts(), on_step=on_step, progress=False)


def _run_killed(mode: str, out_dir, export_dir=None, bits: int = 32) -> None:
    code = (
        f"import sys; sys.path[:0] = [{str(TESTS)!r}, {str(TESTS.parent)!r}]; import test_faults; "
        f"test_faults._killed_run({mode!r}, {str(out_dir)!r}, {export_dir and str(export_dir)!r}, {bits})"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


@pytest.mark.parametrize("mode", ["step", "save"])
def test_kill_during_training_resumes_bit_identical(tmp_path, acts, reference, mode):
    run = tmp_path / "run"
    _run_killed(mode, run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a step killed between orbax's commit and its checksums is "unverified"
        resumed = train(_cfg(run), activations=acts, progress=False)
    _assert_same(resumed.stack, reference.stack)
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["global_step"] for r in rows] == list(range(1, 17))


def test_kill_during_export_keeps_the_previous_export(tmp_path, acts, reference):
    """Run 2 (32-bit) exporting over run 1's export (64-bit) is killed mid-export: run 1's export stays whole; the
    rerun of run 2 then exports exactly what an uninterrupted run 2 does."""
    shared = tmp_path / "hashes"
    first = train(_cfg(tmp_path / "run1", export_dir=str(shared), bits=64), activations=acts, progress=False)
    _run_killed("export", tmp_path / "run2", shared, bits=32)
    _assert_same(load_hashes(shared, TINY, bits=64), first.stack)
    second = train(_cfg(tmp_path / "run2", export_dir=str(shared)), activations=acts, progress=False)
    _assert_same(load_hashes(shared, TINY, bits=32), reference.stack)
    _assert_same(second.stack, reference.stack)


# ----------------------------------------------------------------------------------------------------------------
# A full disk.


def test_full_disk_while_checkpointing_is_one_sentence_and_resumable(tmp_path, acts, reference, monkeypatch):
    import orbax.checkpoint as ocp

    real = ocp.CheckpointManager.save

    def save(self, step, *a, **kw):
        if step == 11:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, step, *a, **kw)

    run = tmp_path / "run"
    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    with pytest.raises(ValueError, match=r"no space left on the device while saving checkpoint step 11") as e:
        train(_cfg(run), activations=acts, progress=False)
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC and "\n" not in str(e.value)
    monkeypatch.setattr(ocp.CheckpointManager, "save", real)
    _assert_same(train(_cfg(run), activations=acts, progress=False).stack, reference.stack)


def test_full_disk_for_the_activation_cache_writes_nothing(tmp_path, monkeypatch):
    from spotlight_jax import activations as act_mod

    monkeypatch.setattr(act_mod.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    samples = np.random.default_rng(0).integers(0, 256, (3, 32)).astype(np.int32)
    with pytest.raises(ValueError, match=r"needs 0\.00 GiB but .* free"):
        collect_activations(CausalLM(TINY, rngs=nnx.Rngs(0)), samples, tmp_path / "a", LAYERS, progress=False)
    assert [p for p in os.listdir(tmp_path / "a") if not p.endswith(".lock")] == []


def test_full_disk_during_export_keeps_the_previous_export(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    old = HashStack(TINY, HashConfig(bits=32, hidden=32), layers=LAYERS, rngs=nnx.Rngs(0))
    path = export_hashes(tmp_path / "h", old)

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", full)
    with pytest.raises(ValueError, match="while writing a hash export"):
        export_hashes(path, HashStack(TINY, HashConfig(bits=32, hidden=32), layers=LAYERS, rngs=nnx.Rngs(1)))
    monkeypatch.undo()
    _assert_same(load_hashes(path, TINY), old)
    assert sorted(os.listdir(tmp_path)) == ["h"]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MiB tmpfs (root only, where mounting is allowed); skipped elsewhere."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# orbax's asynchronous writer, abandoned by the failed save, reports its closed event loop when collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_really_full_disk_mid_run_is_resumable(small_tmpfs, acts, reference):
    """The disk fills up after the first checkpoints (a filler file takes the rest): the run stops with one
    sentence; once space is freed, the same command resumes and ends bit-identical."""
    run, filler = small_tmpfs / "run", small_tmpfs / "filler"

    def fill(layer, step, _):
        if (layer, step) == (2, 4):
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # unbuffered: nothing left to flush at close
            try:
                with pytest.raises(OSError):
                    while True:
                        os.write(fd, b"\0" * 4096)
            finally:
                os.close(fd)

    with pytest.raises(ValueError, match="no space left on the device while"):
        train(_cfg(run), activations=acts, on_step=fill, progress=False)
    filler.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_same(train(_cfg(run), activations=acts, progress=False).stack, reference.stack)


# ----------------------------------------------------------------------------------------------------------------
# Two runs in one out-dir.


def test_second_run_in_the_same_out_dir_is_refused(tmp_path, acts):
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    with open(run / "train.lock", "w") as held:  # another run holds the folder's lock (docs/guarantees.md)
        held.write("12345\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match=rf"{run} is in use by another training run \(pid 12345"):
            train(_cfg(run), activations=acts, progress=False)
    assert not (run / "metrics.jsonl").exists()
    train(_cfg(run, steps_per_layer=2), activations=acts, progress=False)  # free again once the holder is done


# ----------------------------------------------------------------------------------------------------------------
# Unchecked values.


def test_retrieval_config_values():
    for bits in (0, -32, 48):
        with pytest.raises(ValueError, match="bits must be a positive multiple of 32"):
            RetrievalConfig(bits=bits)
    with pytest.raises(ValueError, match="keep_ratio"):
        RetrievalConfig(keep_ratio=0)
    with pytest.raises(ValueError, match="dense_layers"):
        RetrievalConfig(dense_layers=(0, -1))


def test_dense_layers_naming_a_missing_layer(tmp_path, acts):
    from spotlight_jax.generate import generate

    model = CausalLM(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"dense_layers \[0, 7\] name layer\(s\) \[7\].*layers 0\.\.3"):
        rcfg = RetrievalConfig(method="oracle", dense_layers=(0, 7))
        generate(model, [[5, 6, 7]], max_new_tokens=2, retrieval_cfg=rcfg)
    path = export_hashes(tmp_path / "h", HashStack(TINY, HashConfig(bits=32, hidden=32), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"name layer\(s\) \[9\]"):
        load_hashes(path, TINY, RetrievalConfig(method="spotlight", bits=32, dense_layers=(0, 1, 9)))
    with pytest.raises(ValueError, match=r"dense_layers names layer\(s\) \[5\].*layers 0\.\.3"):
        train(_cfg(tmp_path / "run", dense_layers=(0, 1, 5)), activations=acts, progress=False)


def test_token_ids_at_the_model_entry():
    model = CausalLM(TINY, rngs=nnx.Rngs(0))
    for bad, message in (([[1, 256]], "token id 256 is outside"), ([[1, -3]], "token id -3 is outside"),
                         ([[1.0, 2.0]], "token ids must be integers")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            model(jnp.asarray(bad))
    model(jnp.asarray([[1, 255]]))  # the ends of the vocabulary are fine


def test_generate_refuses_bad_ids_and_nan_temperature():
    """Already refused before issue 21 (kept as a guard): ids >= vocab, negative or float ids, NaN temperature."""
    from spotlight_jax.generate import generate

    model = CausalLM(TINY, rngs=nnx.Rngs(0))
    for prompt in ([[1, 300]], [[1, -1]], [[1.0, 2.5]]):
        with pytest.raises(ValueError, match="vocabulary|integer token ids"):
            generate(model, prompt, max_new_tokens=1)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[1, 2]], max_new_tokens=1, temperature=float("nan"))


def test_seq_len_above_the_model_positions(tmp_path):
    from spotlight_jax.train import prepare_activations

    short = ModelConfig(**{**TINY.__dict__, "max_position_embeddings": 48})
    data = _token_file(tmp_path / "d.npz", 0)  # 64-token samples
    cfg = _cfg(tmp_path / "run", dataset=data, seq_len=64, num_samples=3)
    with pytest.raises(ValueError, match=r"seq_len 64 exceeds the 48 positions"):
        prepare_activations(cfg, model=CausalLM(short, rngs=nnx.Rngs(0)), tokenizer=_CharTokenizer(), progress=False)
    samples = np.zeros((1, 64), np.int32)
    with pytest.raises(ValueError, match=r"64 tokens exceed the model's 48 positions"):
        collect_activations(CausalLM(short, rngs=nnx.Rngs(0)), samples, tmp_path / "a", progress=False)


def test_train_config_values(tmp_path):
    cases = {
        "keep_ratio": (0.0, r"keep_ratio must be in \(0, 1\]"),
        "checkpoint_every": (0, "checkpoint_every must be an integer >= 1"),
        "log_every": (0, "log_every must be an integer >= 1"),
        "steps_per_layer": ("7", r"steps_per_layer must be int, got '7'"),
        "lr": (float("nan"), "lr must be a finite number"),
        "seq_len": (1, "seq_len must be an integer >= 2"),
        "data_part": ("test", "data_part must be one of"),
        "layers": ((2, 2), "layers must list distinct layer indices"),
        "out_dir": ("  ", "out_dir must name a folder"),
    }
    for field, (value, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            TrainConfig(**{field: value})
    path = tmp_path / "c.json"
    path.write_text('{"bits": 64, ')
    with pytest.raises(ValueError, match=rf"corrupt {path}"):
        TrainConfig.from_json(str(path))
    path.write_text('{"checkpoint_every": 0}')
    with pytest.raises(ValueError, match=rf"{path}: checkpoint_every must be"):
        TrainConfig.from_json(str(path))


# ----------------------------------------------------------------------------------------------------------------
# Tracebacks where a sentence does.


class _CharTokenizer:
    eos_token_id = 2

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[3 + ord(c) % 200 for c in t] for t in texts]}


def test_bad_dataset_files_and_rows(tmp_path):
    from spotlight_jax.data import DataSourceError, build_samples, load_samples

    cases = {
        "empty.jsonl": (b"", r"empty\.jsonl is empty"),
        "latin1.txt": ("café\n".encode("latin-1") * 50, r"could not read .*latin1\.txt .*must be UTF-8 text"),
        "numbers.jsonl": (b'{"text": 5}\n{"text": 6}\n', r"row 0 of the text column is a int \('5'\), not text"),
        "blank.jsonl": (b'{"text": "  "}\n{"text": null}\n', "the documents are all empty"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataSourceError, match=message):
            build_samples(_CharTokenizer(), str(tmp_path / name), seq_len=4, num_samples=1)
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataSourceError, match=r"cut\.npz is not a token file"):
        load_samples(str(tmp_path / "cut.npz"), seq_len=4, num_samples=1)


def test_run_folder_problems(tmp_path, acts):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"the run folder \(out_dir\) .*file exists but is not a folder"):
        train(_cfg(tmp_path / "file"), activations=acts, progress=False)
    run = tmp_path / "run"
    train(_cfg(run, steps_per_layer=2), activations=acts, progress=False)
    (run / "run_config.json").write_text('{"training": {"bits": 3')
    with pytest.raises(ValueError, match=r"corrupt .*run_config\.json.*cannot be resumed safely"):
        train(_cfg(run, steps_per_layer=2), activations=acts, progress=False)
    (run / "run_config.json").write_text("[]")
    with pytest.raises(ValueError, match=r"run_config\.json: expected a JSON object"):
        train(_cfg(run, steps_per_layer=2), activations=acts, progress=False)


def test_truncated_model_files_are_named(tiny_llama_dir, tmp_path):
    from spotlight_jax.convert import ConversionError, load_model

    folder = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    full = weights.read_bytes()
    weights.write_bytes(full[: len(full) // 2])
    with pytest.raises(ConversionError, match=rf"{weights} is not a readable safetensors file .*download it again"):
        load_model(folder, tokenizer=False)
    weights.write_bytes(full)
    config = folder / "config.json"
    config.write_text(config.read_text()[:40])
    with pytest.raises(ValueError, match=rf"corrupt {config}: "):
        load_model(folder, tokenizer=False)
    config.write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match=rf"{config} lacks 'num_attention_heads'"):
        load_model(folder, tokenizer=False)


def test_safetensors_index_may_not_reach_outside_the_folder(tiny_llama_dir, tmp_path):
    from spotlight_jax.convert import ConversionError, load_model

    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", folder)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(tiny_llama_dir / "model.safetensors", outside / "x.safetensors")
    from safetensors import safe_open

    with safe_open(str(outside / "x.safetensors"), framework="numpy") as f:
        names = list(f.keys())
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, "../outside/x.safetensors")}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"names weight file\(s\) outside .*\.\./outside/x\.safetensors"):
        load_model(folder, tokenizer=False)


def test_empty_hash_path_does_not_load_the_current_folder(tmp_path, monkeypatch):
    """`--hashes PATH` without NAME= used to pass an empty path: it resolved to the current folder."""
    path = export_hashes(tmp_path / "h", HashStack(TINY, HashConfig(bits=32, hidden=32), rngs=nnx.Rngs(0)))
    monkeypatch.chdir(path)
    with pytest.raises(HashCheckpointError, match="empty hash checkpoint path"):
        load_hashes("", TINY)
