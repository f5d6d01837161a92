"""What every command does around its work: one clear message for a user's mistake.

A user's mistake (a bad file, a bad config value, a missing dataset, a
checkpoint of another model) ends the command with exit status 1 and one line
naming the file or field, not a traceback. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import contextlib
import sys

from busi_jax import checkpoints
from busi_jax import data
from busi_jax import io


def user_errors() -> tuple[type[BaseException], ...]:
    from busi_jax import compare, train

    return (
        io.BusiDataError,
        compare.CompareError,
        data.DataConfigError,
        train.ConfigError,
        train.TrainingDiverged,
        checkpoints.CheckpointError,
    )


@contextlib.contextmanager
def exit_on_user_error():
    """Turns a user's mistake into ``error: MESSAGE`` on stderr and exit status 1."""
    try:
        yield
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def run_command(fn, *args, **kwargs):
    """Runs a command-line entry point's work: quiet logs, one line per user error."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    with exit_on_user_error():
        return fn(*args, **kwargs)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that reports a bad ``--config.FIELD`` in one line.

    Pass as ``app.run(main, flags_parser=parse_flags)``.
    """
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections raises these for an unknown field or a value of the
        # wrong type in --config.FIELD=VALUE.
        overrides = [a for a in argv[1:] if a.startswith("--config.")]
        name = str(e).strip("'\"")
        bad = [a for a in overrides if f".{name}=" in a or f".{name}." in a] or overrides
        print(
            f"error: bad config override {' '.join(bad)}: no such field or bad value ({e})",
            file=sys.stderr,
        )
        sys.exit(1)


def maybe_initialize_distributed() -> None:
    """Joins a multi-host run when its environment says so.

    ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES``
    and ``JAX_PROCESS_ID`` set by hand, or ``BUSI_DISTRIBUTED=1`` on a cluster
    that JAX detects by itself (SLURM, Cloud TPU, Kubernetes). A single host
    needs neither: all its local devices are used.
    """
    import os

    import jax

    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif os.environ.get("BUSI_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def run(config, workdir: str) -> dict:
    """Runs the job named by ``config.task`` (what ``launch.py`` calls)."""
    from absl import logging

    from busi_jax import memory, train

    # Before the first JAX computation: every train step then reuses the
    # previous one's scratch memory instead of page-faulting a fresh block.
    memory.keep_freed_memory()

    # Orbax logs every save and restore at INFO; the progress bar and the
    # per-epoch lines say what a user needs.
    logging.set_verbosity(logging.WARNING)
    try:
        task = config.task  # The config file is loaded lazily, here.
    except (OSError, SyntaxError, ImportError) as e:
        msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"error: --config: {msg}", file=sys.stderr)
        sys.exit(1)
    maybe_initialize_distributed()
    with exit_on_user_error():
        if task == "pipeline":
            from busi_jax import pipeline

            return pipeline.run(config, workdir)
        if task == "table1":
            from busi_jax import table1

            return table1.run(config, workdir)
        return train.train_and_evaluate(config, workdir)
