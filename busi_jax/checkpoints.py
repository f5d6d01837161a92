"""Orbax checkpoints of a workdir: the latest full state plus the best k.

Two managers, because they keep different things for different reasons:

* ``checkpoints/latest``: the whole training state (parameters, optimizer
    state, PRNG key) and the loop's bookkeeping (epoch, best metric, epochs
    without progress), kept once. Rerunning an interrupted command resumes
    from it.
* ``checkpoints/best``: only what inference needs (parameters, BatchNorm
    statistics, EMA parameters), kept for the ``keep_best`` best validation
    scores.

Orbax writes each step into a temporary folder and renames it when complete,
so a save killed mid-way never replaces the previous checkpoint; leftover
temporary folders are removed on the next start (``cleanup_tmp_directories``).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used with this config (the message says why)."""


def _options(**kw) -> ocp.CheckpointManagerOptions:
    # Synchronous saves: a save is on disk when `save` returns, which keeps
    # kill-and-resume simple to reason about; a save takes well under a second
    # at these model sizes.
    return ocp.CheckpointManagerOptions(
        create=True, cleanup_tmp_directories=True, enable_async_checkpointing=False, **kw
    )


def abstract(tree: Any) -> Any:
    """The shape/dtype skeleton Orbax needs to restore ``tree`` faithfully."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _score(metrics: dict) -> float:
    # Checkpoints written before "score" existed hold only the named metric.
    return metrics["score"] if "score" in metrics else next(iter(metrics.values()))


class Checkpoints:
    """The latest and best-k checkpoints of one workdir.

    Args:
        workdir: the training workdir.
        metric: name of the validation metric to rank best checkpoints by.
        keep_best: how many best checkpoints to keep.
    """

    def __init__(self, workdir: str | pathlib.Path, metric: str = "score", keep_best: int = 2):
        # Orbax wants absolute paths; a relative --workdir is common.
        root = pathlib.Path(workdir).expanduser().resolve() / "checkpoints"
        self.metric = metric
        self.latest = ocp.CheckpointManager(root / "latest", options=_options(max_to_keep=1))
        self.best = ocp.CheckpointManager(
            root / "best",
            options=_options(
                max_to_keep=keep_best,
                # Ranked by "score" (the validation metric under a fixed name), so
                # a reader does not need to know which metric the run optimised.
                best_fn=_score,
                best_mode="max",
                keep_checkpoints_without_metrics=False,
            ),
        )

    def save_latest(self, step: int, state: Any, meta: dict) -> None:
        self.latest.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self.latest.wait_until_finished()

    def save_best(self, step: int, weights: Any, meta: dict, metrics: dict) -> None:
        if step in self.best.all_steps():
            # A resumed run redoing the epochs after its last full-state save
            # (config.checkpoint_every_epochs > 1) already saved this step.
            return
        self.best.save(
            step,
            args=ocp.args.Composite(
                weights=ocp.args.StandardSave(weights), meta=ocp.args.JsonSave(meta)
            ),
            metrics={
                "score": float(metrics[self.metric]),
                **{k: float(v) for k, v in metrics.items()},
            },
            force=True,
        )
        self.best.wait_until_finished()

    def restore_latest(self, state_like: Any) -> tuple[Any, dict] | None:
        """Restores the latest full state into the structure of ``state_like``."""
        step = self.latest.latest_step()
        if step is None:
            return None
        out = _restore(self.latest, step, "state", state_like)
        return out["state"], dict(out["meta"])

    def best_step(self) -> int | None:
        return self.best.best_step()

    def restore_best(self, weights_like: Any) -> tuple[Any, dict]:
        """Restores the best checkpoint's weights into the structure of ``weights_like``."""
        step = self.best.best_step()
        if step is None:
            raise CheckpointError(f"{self.best.directory}: no best checkpoint (has training run?)")
        out = _restore(self.best, step, "weights", weights_like)
        return out["weights"], dict(out["meta"])

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def restore_last_weights(self, weights_like: Any, use_ema: bool) -> tuple[Any, dict]:
        """The latest full state's evaluation weights, in the structure of ``weights_like``.

        The weights the run ended with (the last epoch's, not the one
        validation picked): ``ema_params`` if ``use_ema`` else ``params``, with
        the BatchNorm statistics, as :meth:`restore_best` would give them.
        """
        step = self.latest.latest_step()
        if step is None:
            raise CheckpointError(f"{self.latest.directory}: no checkpoint (has training run?)")
        try:
            # No target: the optimizer state is not needed and its structure
            # depends on the optimizer config; the weights are plain dicts.
            out = self.latest.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()
                ),
            )
            state = out["state"]
            weights = {
                "params": state["ema_params" if use_ema else "params"],
                "batch_stats": state.get("batch_stats") or {},
            }
        except Exception as e:  # Orbax raises many types for unreadable checkpoints.
            raise CheckpointError(
                f"{self.latest.directory}/{step}: unreadable ({type(e).__name__}:"
                f" {str(e).splitlines()[0][:300] if str(e) else ''})"
            ) from None
        like_leaves, like_tree = jax.tree.flatten(weights_like)
        leaves, tree = jax.tree.flatten(weights)
        if tree != like_tree or any(
            np.shape(a) != np.shape(b) for a, b in zip(leaves, like_leaves)
        ):
            raise CheckpointError(
                f"{self.latest.directory}/{step}: checkpoint does not fit this config's model."
                " Was it written by another model or config?"
            )
        weights = jax.tree.unflatten(
            like_tree, [np.asarray(a, dtype=b.dtype) for a, b in zip(leaves, like_leaves)]
        )
        return weights, dict(out["meta"])

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def _restore(manager, step, key, like):
    try:
        return manager.restore(
            step,
            args=ocp.args.Composite(
                **{key: ocp.args.StandardRestore(abstract(like)), "meta": ocp.args.JsonRestore()}
            ),
        )
    except Exception as e:  # Orbax raises many types for a structure mismatch.
        raise CheckpointError(
            f"{manager.directory}/{step}: checkpoint does not fit this config's model"
            f" ({type(e).__name__}: {str(e).splitlines()[0][:300]}). Was it written by"
            " another model or config? Use a fresh --workdir."
        ) from None
