"""Trains a busi-jax experiment: python launch.py --config=configs/unetpp.py --workdir=DIR."""

from absl import app
from absl import flags
from ml_collections import config_flags

import busi_jax.cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (resumes a run found there).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    busi_jax.cli.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main, flags_parser=busi_jax.cli.parse_flags)
