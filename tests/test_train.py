"""The training loop end to end on tiny synthetic data: outputs, determinism, resume, errors."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from busi_jax import losses, train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _epochs(workdir):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(l) for l in lines]


def _strip_timing(records):
    return [
        {k: v for k, v in r.items() if k not in ("img_per_s", "epoch_seconds")} for r in records
    ]


def test_train_writes_workdir_and_is_deterministic(tiny_config, tmp_path):
    a = train.train_and_evaluate(tiny_config, tmp_path / "a")
    wd = tmp_path / "a"
    assert json.loads((wd / "config.json").read_text())["model"]["features"] == 4
    recs = _epochs(wd)
    assert [r["epoch"] for r in recs] == [1, 2]
    assert all(0.0 <= r["lesion_dice"] <= 1.0 for r in recs)
    assert (wd / "final_metrics.json").exists()
    assert any((wd / "tensorboard").iterdir())
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["best", "latest"]
    b = train.train_and_evaluate(tiny_config, tmp_path / "b")
    assert _strip_timing(recs) == _strip_timing(_epochs(tmp_path / "b"))
    assert a == b


def test_loss_falls_on_training_data(tiny_config, tmp_path):
    tiny_config.num_epochs = 4
    tiny_config.augment.enabled = False
    train.train_and_evaluate(tiny_config, tmp_path)
    losses = [r["train_loss"] for r in _epochs(tmp_path)]
    assert losses[-1] < losses[0], losses


def test_rerun_of_finished_run_resumes_without_training(tiny_config, tmp_path):
    first = train.train_and_evaluate(tiny_config, tmp_path)
    again = train.train_and_evaluate(tiny_config, tmp_path)
    assert first == again
    assert len(_epochs(tmp_path)) == 2


def test_workdir_of_another_model_is_refused(tiny_config, tmp_path):
    train.train_and_evaluate(tiny_config, tmp_path)
    tiny_config.model.name = "unet"
    with pytest.raises(train.ConfigError, match="different config.model"):
        train.train_and_evaluate(tiny_config, tmp_path)


def test_options_stated_at_the_models_defaults_match_runs_that_left_them_out():
    """configs/sunet.py gained se/attention/... fields: older SUNet workdirs still match it."""
    from configs import sunet

    new = json.loads(sunet.get_config().to_json_best_effort())

    def variant(**changes):
        cfg = json.loads(json.dumps(new))
        for key, value in changes.items():
            if value is None:
                del cfg["model"][key]
            else:
                cfg["model"][key] = value
        return train.config_identity(cfg, "model")

    older = variant(se=None, se_reduction=None, attention=None, dilated_bottleneck=None)
    assert older == train.config_identity(new, "model")
    assert variant(dilations=[1, 2, 4]) == older  # JSON's list for the tuple default.
    assert variant(attention=True) != older
    assert variant(se="none") != older  # Not SUNet's default: another model.
    assert variant(features=32) == variant(features=None)  # 32 is the class default.


def test_cross_validation_run_validates_on_its_fold_and_keeps_it(tiny_config, tmp_path):
    tiny_config.data.cv_fold = 1
    tiny_config.num_epochs = 1
    final = train.train_and_evaluate(tiny_config, tmp_path)
    assert final["split"] == "cv fold 1"
    assert [e["split"] for e in _epochs(tmp_path)] == ["cv fold 1"]
    # Another fold is another run: resuming this workdir with it is refused.
    tiny_config.data.cv_fold = 2
    with pytest.raises(train.ConfigError, match="different config.data"):
        train.train_and_evaluate(tiny_config, tmp_path)


def test_run_resumes_after_its_dataset_moved(tiny_config, tiny_data_dir, tmp_path):
    """data_dir says where the data live, not what they are: a moved build resumes."""
    import shutil

    from busi_jax import data

    tiny_config.num_epochs = 1
    first = train.train_and_evaluate(tiny_config, tmp_path / "wd")
    fp = json.loads((tmp_path / "wd" / train.DATA_FINGERPRINT).read_text())
    moved = tmp_path / "moved_tfds"
    shutil.copytree(tiny_data_dir, moved)
    tiny_config.data.data_dir = str(moved)
    assert data.fingerprint(tiny_config.data) == fp
    assert train.train_and_evaluate(tiny_config, tmp_path / "wd") == first
    # The build there holding other scans: resuming would mix two datasets.
    (tmp_path / "wd" / train.DATA_FINGERPRINT).write_text(json.dumps(dict(fp, train="0" * 16)))
    with pytest.raises(train.ConfigError, match="trained on other scans"):
        train.train_and_evaluate(tiny_config, tmp_path / "wd")


def test_speed_options_may_change_on_resume(tiny_config, tmp_path):
    """model.wgrad changes speed, not the model: a run may resume with the other kernel."""
    train.train_and_evaluate(tiny_config, tmp_path)
    tiny_config.model.wgrad = "native"
    train.train_and_evaluate(tiny_config, tmp_path)  # Finished: resumes without training.


def test_native_amx_without_amx_is_a_config_error(tiny_config, tmp_path, monkeypatch):
    from busi_jax.models import conv

    monkeypatch.setattr(conv, "amx_available", lambda: False)
    tiny_config.model.wgrad = "native_amx"
    with pytest.raises(train.ConfigError, match="needs a CPU with AMX bf16 tiles"):
        train.train_and_evaluate(tiny_config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_native_bf16_without_amx_or_avx512_bf16_is_a_config_error(
    tiny_config, tmp_path, monkeypatch
):
    from busi_jax.models import conv

    monkeypatch.setattr(conv, "amx_available", lambda: False)
    monkeypatch.setattr(conv, "avx512_bf16_available", lambda: False)
    tiny_config.model.wgrad = "native_bf16"
    with pytest.raises(train.ConfigError, match="AMX bf16 tiles or AVX-512 BF16"):
        train.train_and_evaluate(tiny_config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_native_amx_refused_by_the_os_is_a_config_error(tiny_config, tmp_path, monkeypatch):
    from busi_jax.models import conv

    def refused(*args):
        raise RuntimeError("busi_conv_amx: the kernel refused AMX tile state (arch_prctl)")

    monkeypatch.setattr(conv, "amx_available", lambda: True)
    monkeypatch.setattr(conv, "amx_conv", refused)
    tiny_config.model.wgrad = "native_amx"
    with pytest.raises(train.ConfigError, match="cannot run on this machine: .*arch_prctl"):
        train.train_and_evaluate(tiny_config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_native_wgrad_without_compiler_is_a_config_error(tiny_config, tmp_path, monkeypatch):
    from busi_jax import native

    def no_compiler(name):
        raise native.NativeBuildError("no C++ compiler on PATH")

    monkeypatch.setattr(native, "load", no_compiler)
    tiny_config.model.wgrad = "native"
    with pytest.raises(train.ConfigError, match="config.model.wgrad='native': no C"):
        train.train_and_evaluate(tiny_config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "field,value,msg",
    [
        ("batch_size", 0, "positive integer"),
        ("batch_size", -3, "positive integer"),
        ("learning_rate", 0.0, "positive"),
        ("learning_rate", -1e-3, "positive"),
        ("num_epochs", 0, "positive"),
        ("schedule", "linear", "must be"),
        ("ema_decay", 1.0, "must lie in"),
        ("loss", "focal", "must be one of 'dice', 'tversky', 'lovasz'"),
        ("tversky_alpha", -0.1, "must be >= 0"),
        ("tversky_gamma", 0.0, "must be > 0"),
    ],
)
def test_bad_config_values(tiny_config, tmp_path, field, value, msg):
    tiny_config[field] = value
    with pytest.raises(train.ConfigError, match=f"config.{field}.*{msg}"):
        train.train_and_evaluate(tiny_config, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_bad_winograd_value(tiny_config, tmp_path):
    # ConfigDict refuses a str for the default's bool; a config building its
    # own model dict gets the check.
    tiny_config.model = ml_collections.ConfigDict(
        {**tiny_config.model.to_dict(), "winograd": "yes"}
    )
    with pytest.raises(train.ConfigError, match="config.model.winograd='yes': must be True or"):
        train.train_and_evaluate(tiny_config, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_bad_classifier_input_mode(tiny_config, tmp_path):
    tiny_config.task = "classification"
    tiny_config.classifier.input_mode = "roii"
    with pytest.raises(
        train.ConfigError, match="config.classifier.input_mode='roii': must be one of 'image', "
    ):
        train.train_and_evaluate(tiny_config, tmp_path)
    assert not (tmp_path / "config.json").exists()


def _launch(args, env_extra=None, cwd=ROOT, **kw):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        **kw,
    )


def _tiny_args(data_dir, workdir, epochs=2):
    return [
        f"--config={ROOT / 'configs' / 'demo.py'}",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        "--config.data.synthetic_per_class=6",
        "--config.model.features=4",
        "--config.model.depth=2",
        f"--config.num_epochs={epochs}",
        "--config.batch_size=4",
        "--config.eval_batch_size=8",
        "--config.progress=False",
    ]


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("--config.bogus=1", "bad config override --config.bogus=1"),
        ("--config.batch_size=0", "config.batch_size=0: must be a positive integer"),
        ("--config.learning_rate=-1", "config.learning_rate=-1.0: must be a positive number"),
        ("--config.learning_rate=abc", "could not convert"),
        ("--config.data.cv_fold=7", "data.cv_fold must be an integer in [0, 5)"),
    ],
)
def test_launch_reports_bad_config_in_one_line(tiny_data_dir, tmp_path, override, fragment):
    r = _launch(_tiny_args(tiny_data_dir, tmp_path / "wd") + [override], timeout=300)
    assert r.returncode == 1
    assert fragment in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_launch_without_busi_says_how_to_get_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "BUSI_MANUAL_DIR"}
    # An empty data_dir: a BUSI build left by an earlier run must not count.
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch.py"),
            f"--config={ROOT / 'configs' / 'unetpp.py'}",
            f"--workdir={tmp_path / 'wd'}",
            f"--config.data.data_dir={tmp_path / 'tfds'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1
    assert "needs the BUSI dataset" in r.stderr and "BUSI_MANUAL_DIR" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "wd").exists()


def test_unwritable_workdir(tiny_data_dir, tmp_path):
    # A path under a regular file cannot be created even by root (for whom
    # permission bits do not apply).
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _launch(_tiny_args(tiny_data_dir, blocker / "wd"), timeout=300)
    assert r.returncode == 1 and "not writable" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_sigkill_then_rerun_matches_uninterrupted(tiny_data_dir, tmp_path):
    whole = tmp_path / "whole"
    r = _launch(_tiny_args(tiny_data_dir, whole, epochs=3), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]

    # A relative --workdir, as users type it (Orbax itself needs absolute paths).
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), *_tiny_args(tiny_data_dir, "killed", epochs=3)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 600
    # Kill as soon as the first epoch's checkpoint is complete.
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and any(p.name.isdigit() for p in latest.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final_metrics.json").exists()

    r = _launch(_tiny_args(tiny_data_dir, "killed", epochs=3), cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Resuming" in r.stderr
    assert _strip_timing(_epochs(killed)) == _strip_timing(_epochs(whole))
    assert json.loads((killed / "final_metrics.json").read_text()) == json.loads(
        (whole / "final_metrics.json").read_text()
    )


def test_sparse_full_state_saves_resume_by_redoing_epochs(tiny_config, tmp_path):
    # A constant learning rate: a 2-epoch run's state is the 3-epoch run's at epoch 2.
    tiny_config.schedule = "constant"
    tiny_config.num_epochs = 3
    tiny_config.checkpoint_every_epochs = 2
    first = train.train_and_evaluate(tiny_config, tmp_path)
    records = _strip_timing(_epochs(tmp_path))
    assert first["best_epoch"] == 3  # So the redone epoch saves a best step again.
    latest = tmp_path / "checkpoints" / "latest"
    assert len([d for d in latest.iterdir() if d.name.isdigit()]) == 1  # Epoch 3 (the end).
    # Back to the epoch-2 save, as if killed during epoch 3 after its best save.
    shutil.rmtree(latest)
    tiny_config.num_epochs = 2
    train.train_and_evaluate(tiny_config, tmp_path / "two")
    shutil.copytree(tmp_path / "two" / "checkpoints" / "latest", latest)
    tiny_config.num_epochs = 3
    again = train.train_and_evaluate(tiny_config, tmp_path)
    assert _strip_timing(_epochs(tmp_path)) == records  # Epoch 3 redone, same numbers.
    assert again == first


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
    import jax.numpy as jnp

    from busi_jax import checkpoints

    tiny_config.num_epochs = 1
    train.train_and_evaluate(tiny_config, tmp_path)
    steps = _epochs(tmp_path)[-1]["step"]

    tiny_config.num_epochs = 2

    def nan_loss(out, batch):
        return jnp.mean(out) * jnp.nan

    with pytest.raises(train.TrainingDiverged, match=f"at step {steps + 1} .*epoch 2"):
        train.train_and_evaluate(tiny_config, tmp_path, loss_fn=nan_loss)
    ck = checkpoints.Checkpoints(tmp_path)
    assert ck.latest.latest_step() == steps
    ck.close()
    # The same command without the fault resumes from that checkpoint.
    out = train.train_and_evaluate(tiny_config, tmp_path)
    assert out["epochs_run"] == 2


def test_save_killed_midway_leaves_previous_checkpoint_usable(tiny_config, tmp_path):
    # A save killed mid-way leaves Orbax's temporary folder beside the last
    # complete step; the rerun must ignore it, resume from that step and
    # clean it up.
    tiny_config.num_epochs = 1
    train.train_and_evaluate(tiny_config, tmp_path)
    latest = tmp_path / "checkpoints" / "latest"
    (step,) = [int(p.name) for p in latest.iterdir() if p.name.isdigit()]
    partial = latest / f"{step + 99}.orbax-checkpoint-tmp-1234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half_written").write_bytes(b"\0" * 100)
    tiny_config.num_epochs = 2
    out = train.train_and_evaluate(tiny_config, tmp_path)
    assert out["epochs_run"] == 2
    assert [r["epoch"] for r in _epochs(tmp_path)] == [1, 2]
    assert not partial.exists()


def test_checkpoint_of_another_model_is_one_clear_error(tiny_config, tmp_path):
    from busi_jax import checkpoints

    tiny_config.num_epochs = 1
    train.train_and_evaluate(tiny_config, tmp_path)
    (
        tmp_path / "config.json"
    ).unlink()  # Bypass the config check: the checkpoint itself must be caught.
    tiny_config.model.features = 6
    with pytest.raises(checkpoints.CheckpointError, match="does not fit this config's model"):
        train.train_and_evaluate(tiny_config, tmp_path)


@pytest.mark.parametrize(
    "name",
    sorted(
        p.stem
        for p in (ROOT / "configs").glob("*.py")
        if not p.stem.startswith("_") and p.stem not in ("pipeline", "table1")
    ),
)
def test_every_experiment_config_validates_and_builds_its_model(name):
    import importlib

    from busi_jax import models

    config = importlib.import_module(f"configs.{name}").get_config()
    train.validate_config(config)
    model = models.create_model(config.model)
    assert isinstance(model, models.MODELS[config.model.name])
    if name == "unetpp_ds":
        assert model.deep_supervision and model.num_heads == config.model.depth


def test_ema_decay_warms_up_then_caps():
    import numpy as np

    at = lambda step, warm: float(train.ema_decay_at(step, 0.99, warm))  # noqa: E731
    assert at(0, True) == pytest.approx(0.1)
    assert at(80, True) == pytest.approx(0.9)
    assert at(10_000, True) == pytest.approx(0.99)
    assert at(0, False) == pytest.approx(0.99)
    assert float(train.ema_decay_at(5, 0.0, True)) == 0.0
    steps = np.arange(0, 2000, 50)
    decays = [at(t, True) for t in steps]
    assert np.all(np.diff(decays) >= 0)


def test_train_step_ema_follows_the_warmed_up_decay(tiny_config):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from busi_jax import augment as augment_lib

    task = train.make_task(tiny_config)
    tx = train.make_optimizer(tiny_config, steps_per_epoch=4)
    rng = np.random.default_rng(0)
    raw = {
        "image": jnp.asarray(rng.integers(0, 255, (2, 32, 32, 1), dtype=np.uint8)),
        "mask": jnp.asarray((rng.random((2, 32, 32, 1)) > 0.7).astype(np.uint8)),
    }
    # Jitted: op-by-op, the init compiles each of its ops separately (~20 s).
    state = jax.jit(lambda r: train.init_state(task, tx, r, jax.random.key(0), jax.random.key(1)))(
        raw
    )
    cfg = augment_lib.AugmentConfig(enabled=False)
    leaf = lambda tree: np.asarray(jax.tree.leaves(tree)[0])  # noqa: E731
    # The first step averages with the warmed-up decay 0.1, not the configured
    # 0.99 (the flat rule is ema_decay_at's, tested above; one compilation here).
    step = jax.jit(
        lambda s, b: train.train_step(
            s, b, task=task, tx=tx, aug_cfg=cfg, ema_decay=0.99, ema_warmup=True
        )
    )
    new, _ = step(state, raw)
    expect = 0.1 * leaf(state.params) + 0.9 * leaf(new.params)
    np.testing.assert_allclose(leaf(new.ema_params), expect, rtol=1e-5, atol=1e-7)
    assert not np.allclose(leaf(new.params), leaf(state.params))


@pytest.mark.parametrize("name", train.SEGMENTATION_LOSSES)
def test_every_segmentation_loss_name_builds_its_loss(name):
    """config.loss: a region loss, BCE, or '<region>_bce' = region + bce_weight * BCE."""
    from configs import default

    config = default.get_config()
    config.loss = name
    config.bce_weight = 0.25
    logits = jax.random.normal(jax.random.key(0), (2, 8, 8, 1)) * 2
    mask = (jax.random.uniform(jax.random.key(1), (2, 8, 8, 1)) > 0.5).astype(jnp.float32)
    bce = float(losses.bce_loss(logits, mask))
    region = {
        "dice": losses.dice_loss,
        "tversky": losses.tversky_loss,
        "lovasz": losses.lovasz_hinge_loss,
    }
    base = name.removesuffix("_bce")
    want = bce if name == "bce" else float(region[base](logits, mask))
    if name.endswith("_bce"):
        want += 0.25 * bce
    got = jax.jit(train.segmentation_loss(config))(logits, mask)
    assert float(got) == pytest.approx(want, rel=1e-6)


def test_init_from_starts_at_another_runs_best_weights(tiny_pipeline, tiny_data_dir, tmp_path):
    """config.init_from: fine-tuning starts at the source run's best weights, not at random."""
    from busi_jax import inference

    from conftest import tiny_demo_config

    _, pipeline_dir, _ = tiny_pipeline
    source = pipeline_dir / "segmenter"
    _, _, want = inference.load_model(source)
    config = tiny_demo_config(tiny_data_dir, epochs=1)
    config.learning_rate = 1e-9  # Adam steps ~ the learning rate: the weights barely move.
    config.init_from = str(source)
    train.train_and_evaluate(config, tmp_path / "tuned")
    _, _, got = inference.load_model(tmp_path / "tuned")
    for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(want["params"])):
        np.testing.assert_allclose(a, b, atol=1e-6)
    config.init_from = None  # The same run from a random start ends elsewhere.
    train.train_and_evaluate(config, tmp_path / "fresh")
    _, _, fresh = inference.load_model(tmp_path / "fresh")
    assert not np.allclose(jax.tree.leaves(fresh["params"])[0], jax.tree.leaves(want["params"])[0])


def test_init_from_refuses_what_it_cannot_use(tiny_pipeline, tiny_data_dir, tmp_path):
    """A missing source, one trained on other scans, or another model's weights: one error,
    and the new workdir stays empty."""
    from conftest import tiny_demo_config

    _, pipeline_dir, _ = tiny_pipeline
    other_split = tmp_path / "other_split"
    shutil.copytree(pipeline_dir / "segmenter", other_split)
    fp = json.loads((other_split / train.DATA_FINGERPRINT).read_text())
    (other_split / train.DATA_FINGERPRINT).write_text(json.dumps({**fp, "train": "another"}))
    cases = [
        (tmp_path / "nowhere", {}, "no best checkpoint"),
        (other_split, {}, "trained on another split"),
        (pipeline_dir / "segmenter", {"features": 8}, "does not fit"),
    ]
    for i, (source, model, message) in enumerate(cases):
        config = tiny_demo_config(tiny_data_dir, epochs=1)
        config.model.update(model)
        config.init_from = str(source)
        with pytest.raises(train.ConfigError, match=f"config.init_from=.*{message}"):
            train.train_and_evaluate(config, tmp_path / f"run{i}")
        assert not (tmp_path / f"run{i}").exists()
