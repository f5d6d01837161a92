"""Data parallelism: two forced host devices give the one-device loss curve."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(tiny_data_dir, workdir, devices):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    args = [
        f"--config={ROOT / 'configs' / 'demo.py'}",
        f"--workdir={workdir}",
        f"--config.data.data_dir={tiny_data_dir}",
        "--config.data.synthetic_per_class=6",
        "--config.model.features=4",
        "--config.model.depth=2",
        "--config.num_epochs=2",
        "--config.batch_size=4",
        "--config.eval_batch_size=8",
        "--config.log_every_steps=1",
        "--config.progress=False",
    ]
    r = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_two_devices_match_one(tiny_data_dir, tmp_path):
    one = _run(tiny_data_dir, tmp_path / "one", 1)
    two = _run(tiny_data_dir, tmp_path / "two", 2)
    assert {r["devices"] for r in one} == {1} and {r["devices"] for r in two} == {2}
    for a, b in zip(one, two, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4 * max(1.0, abs(a["train_loss"])), (
            a,
            b,
        )
        assert abs(a["lesion_dice"] - b["lesion_dice"]) < 1e-3, (a, b)
