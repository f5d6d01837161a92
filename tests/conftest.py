"""Shared fixtures: a tiny synthetic dataset built once per test session."""

import atexit
import os
import pathlib
import shutil
import sys
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `configs` is imported as a package by the tests.
    sys.path.insert(0, str(ROOT))

# Most tests train the same tiny models, each call tracing a fresh closure, so
# XLA compiled identical programs again and again (about a third of the
# suite's time on 2 cores). A compilation cache shared by this session and the
# launch.py subprocesses it starts (they inherit the environment) compiles
# each program once. It lives in a temporary folder removed at exit, so runs
# never see each other's entries; a cache the caller set up is left alone.
# pytest-xdist's workers start after the controller has run this, so they
# inherit the variable and share the one cache (an entry read while the other
# worker is still writing it fails to decompress; JAX warns and compiles).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="busi_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """A data_dir holding a built 16-scan synthetic dataset (see tiny_config)."""
    from busi_jax import data

    data_dir = tmp_path_factory.mktemp("tfds")
    data.builder(_data_fields(data_dir))
    return data_dir


def _data_fields(data_dir):
    return dict(
        source="synthetic",
        image_size=128,
        data_dir=str(data_dir),
        manual_dir=None,
        synthetic_seed=0,
        synthetic_per_class=6,
    )


def tiny_demo_config(data_dir, epochs=2):
    """The demo config shrunk to seconds: a width-4, depth-2 U-Net++ on the tiny dataset."""
    from configs import demo

    config = demo.get_config()
    config.data.data_dir = str(data_dir)
    config.data.synthetic_per_class = 6
    config.model.features = 4
    config.model.depth = 2
    config.num_epochs = epochs
    config.batch_size = 4
    config.eval_batch_size = 8
    config.progress = False
    return config


@pytest.fixture
def tiny_config(tiny_data_dir):
    """The tiny demo config for 2 epochs."""
    return tiny_demo_config(tiny_data_dir)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_data_dir, tmp_path_factory):
    """A trained tiny pipeline workdir (1-epoch segmenter, 1-epoch classifier): (config, workdir, result)."""
    from busi_jax import pipeline
    from configs import pipeline as pipeline_config

    seg = tiny_demo_config(tiny_data_dir, epochs=1)
    config = pipeline_config.get_config()
    config.segmenter = seg
    cls = config.classifier_stage
    cls.num_epochs = 1
    cls.progress = False
    cls.model.features = (4, 8)
    cls.batch_size = 4
    workdir = tmp_path_factory.mktemp("pipeline")
    result = pipeline.run(config, workdir)
    return config, workdir, result
