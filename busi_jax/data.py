"""Built BUSI splits as in-memory numpy arrays (no TensorFlow at run time).

The built dataset is small (hundreds of 128-px scans), so a whole split is read
once into host arrays and then moved to device memory by the training loop;
there is no input pipeline to tune.
"""

from __future__ import annotations

import os
import pathlib
from typing import Mapping

import numpy as np

from busi_jax import io as busi_io

ENV_MANUAL_DIR = "BUSI_MANUAL_DIR"
SYNTHETIC = "synthetic"


class DataConfigError(ValueError):
    """A data config field is missing or wrong; the message names the field."""


NO_BUSI_MESSAGE = (
    "This config needs the BUSI dataset, and none was given. Download the public"
    " release 'Dataset_BUSI_with_GT' (Al-Dhabyani et al., Data in Brief 28 (2020)"
    " 104863; see tfds_busi/README.md), put it in a folder DIR, and either set"
    f" {ENV_MANUAL_DIR}=DIR or pass --config.data.manual_dir=DIR. To try the project"
    " without BUSI, use --config=configs/demo.py (synthetic phantoms)."
)


def resolve_manual_dir(manual_dir: str | None) -> str:
    """The manual dir from the config field, else ``$BUSI_MANUAL_DIR``.

    Raises:
        DataConfigError: neither is set (message says how to get BUSI).
        busi_io.BusiDataError: the folder does not exist.
    """
    path = manual_dir or os.environ.get(ENV_MANUAL_DIR)
    if not path:
        raise DataConfigError(NO_BUSI_MESSAGE)
    if not pathlib.Path(path).is_dir():
        raise busi_io.BusiDataError(f"{path}: BUSI manual dir does not exist. {NO_BUSI_MESSAGE}")
    return path


def ensure_synthetic(
    root: str | os.PathLike[str], *, seed: int, num_normal: int, num_benign: int, num_malignant: int
) -> pathlib.Path:
    """Writes the synthetic phantom folder once; later calls reuse it."""
    from busi_jax import synthetic  # Imported lazily: only the demo needs it.

    root = pathlib.Path(root)
    if (root / "truth.json").exists():
        return root
    return synthetic.generate(
        root,
        num_normal=num_normal,
        num_benign=num_benign,
        num_malignant=num_malignant,
        seed=seed,
    )


def builder(data_config: Mapping, *, prepare: bool = True):
    """Returns the prepared TFDS builder named by a data config.

    Args:
        data_config: fields ``source`` ('busi' or 'synthetic'), ``image_size``,
            ``data_dir`` (where built datasets live), ``manual_dir`` (BUSI folder,
            or None for ``$BUSI_MANUAL_DIR``), and for synthetic data
            ``synthetic_seed`` and ``synthetic_per_class``.
        prepare: build the dataset if it is not built yet.

    A BUSI dataset already built in ``data_dir`` is reused as it is: to rebuild
    from another copy of BUSI, point ``data_dir`` elsewhere or delete
    ``data_dir/busi``.
    """
    import tensorflow_datasets as tfds

    import tfds_busi  # noqa: F401  (registers 'busi')

    source = data_config["source"]
    size = int(data_config["image_size"])
    if size not in (128, 256):
        raise DataConfigError(f"data.image_size must be 128 or 256, got {size}")
    data_dir = pathlib.Path(data_config["data_dir"]).expanduser()
    if source == "busi":
        # Resolved only when a build is needed: an already built dataset is
        # usable without the raw folder (e.g. evaluate on another machine).
        manual_dir = None
        ds_dir = data_dir
    elif source == SYNTHETIC:
        n = int(data_config["synthetic_per_class"])
        if n < 4:
            raise DataConfigError(f"data.synthetic_per_class must be at least 4, got {n}")
        seed = int(data_config["synthetic_seed"])
        manual_dir = ensure_synthetic(
            data_dir / "synthetic_manual" / f"seed{seed}_n{n}",
            seed=seed,
            num_normal=max(n // 2, 2),
            num_benign=n,
            num_malignant=n,
        )
        # A separate data dir per synthetic variant, so they never overwrite
        # each other or a BUSI build.
        ds_dir = data_dir / "synthetic_built" / f"seed{seed}_n{n}"
    else:
        raise DataConfigError(f"data.source must be 'busi' or '{SYNTHETIC}', got {source!r}")
    b = tfds.builder(f"busi/{size}", data_dir=os.fspath(ds_dir), file_format="array_record")
    if prepare and not b.is_prepared():
        if manual_dir is None:
            manual_dir = resolve_manual_dir(data_config.get("manual_dir"))
        b.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
        )
    return b


def load_split(data_config: Mapping, split: str) -> dict[str, np.ndarray]:
    """Loads a built split into numpy arrays.

    Args:
        data_config: see :func:`builder`.
        split: a TFDS split name or slice (``'train'``, ``'validation'``,
            ``'test'``, ``'train[:50%]'``...).

    Returns:
        ``image`` ``[N, S, S, 1]`` uint8, ``mask`` ``[N, S, S, 1]`` uint8 in {0, 1},
        ``label`` ``[N]`` int32 (0 normal, 1 benign, 2 malignant), ``group``
        ``[N]``, ``fold`` ``[N]``, ``num_masks`` ``[N]`` int32, ``file_name``
        ``[N]`` str, in the dataset's stored order.
    """
    b = builder(data_config)
    source = b.as_data_source(split=split)
    n = len(source)
    rows = source.__getitems__(list(range(n))) if n else []
    size = b.builder_config.image_size
    out = {
        "image": np.zeros((n, size, size, 1), np.uint8),
        "mask": np.zeros((n, size, size, 1), np.uint8),
    }
    for i, r in enumerate(rows):
        out["image"][i] = r["image"]
        out["mask"][i] = r["segmentation_mask"]
    out["label"] = np.array([r["label"] for r in rows], np.int32)
    out["group"] = np.array([r["group"] for r in rows], np.int32)
    out["fold"] = np.array([r["fold"] for r in rows], np.int32)
    out["num_masks"] = np.array([r["num_masks"] for r in rows], np.int32)
    out["file_name"] = np.array(
        [
            r["file_name"].decode() if isinstance(r["file_name"], bytes) else r["file_name"]
            for r in rows
        ]
    )
    return out


def fingerprint(data_config: Mapping) -> dict[str, str]:
    """What a built dataset holds: per split, a hash of its sorted scan names.

    Where the data live (``data_dir``, ``manual_dir``) is not what they are:
    a run trained on a copy of the same build elsewhere (another machine, a
    GPU host) still pairs with runs here, and a build from another copy of
    BUSI (other scans, so other splits) does not, wherever it lives.

    Returns:
        ``{split: 16 hex digits}`` for every split of the dataset.
    """
    import hashlib

    b = builder(data_config)
    out = {}
    for split in sorted(b.info.splits.keys()):
        names = sorted(str(n) for n in load_split(data_config, split)["file_name"])
        out[split] = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    return out


ROLES = ("train", "eval")


def load_run_split(data_config: Mapping, role: str) -> dict[str, np.ndarray]:
    """Loads the scans a training run fits (``role='train'``) or validates on (``'eval'``).

    Without ``cv_fold`` these are the splits ``train_split`` and
    ``eval_split``. With ``cv_fold=k`` (k-fold cross-validation, as in
    nnU-Net) the two splits are pooled and fold ``k`` is held out for
    validation: the builder deals whole near-duplicate groups to folds, so no
    group straddles the two, and ``test`` is never touched.

    Args:
        data_config: see :func:`builder`; plus ``train_split``, ``eval_split``
            and optionally ``cv_fold``.
        role: ``'train'`` or ``'eval'``.

    Returns:
        Arrays as in :func:`load_split`.

    Raises:
        DataConfigError: ``cv_fold`` is not a fold of the built dataset.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    fold = data_config.get("cv_fold")
    if fold is None:
        return load_split(
            data_config, data_config["train_split" if role == "train" else "eval_split"]
        )
    pool = load_pool(data_config)
    num_folds = builder(data_config).builder_config.num_folds
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < num_folds:
        raise DataConfigError(
            f"data.cv_fold must be an integer in [0, {num_folds}) (the dataset's folds), got {fold!r}"
        )
    folds = [f for f in range(num_folds) if f != fold] if role == "train" else [fold]
    out = select_folds(pool, folds)
    if not len(out["label"]):
        raise DataConfigError(
            f"data.cv_fold={fold}: no {'training' if role == 'train' else 'held-out'} scans"
            f" (folds {folds} of {data_config['train_split']} + {data_config['eval_split']} are empty)"
        )
    return out


def load_pool(data_config: Mapping) -> dict[str, np.ndarray]:
    """``train_split`` and ``eval_split`` concatenated: the scans cross-validation deals out."""
    return concat(
        load_split(data_config, data_config["train_split"]),
        load_split(data_config, data_config["eval_split"]),
    )


def select_folds(arrays: Mapping[str, np.ndarray], folds) -> dict[str, np.ndarray]:
    """The rows of ``arrays`` whose ``fold`` is in ``folds``."""
    keep = np.isin(arrays["fold"], np.asarray(list(folds)))
    return {k: v[keep] for k, v in arrays.items()}


def concat(*parts: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenates split dicts key by key."""
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
