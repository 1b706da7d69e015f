"""Prepared-data store: memory-mapped NumPy columns plus a JSON manifest.

Layout of a prepared data set directory (SPEC section 4, "columnar, memory-mappable format with a
manifest")::

    DIR/manifest.json                 schema, vocabulary sizes, row counts, source checksums
    DIR/users/<field>.npy             int32 [num_users] or [num_users, L] (multi-hot)
    DIR/users/<field>.mask.npy        bool  [num_users, L] (multi-hot fields only)
    DIR/items/<field>.npy, .mask.npy  the same for the item table
    DIR/interactions/<col>.npy        user int32, item int32, scenario int32, label float32,
                                      split int8 (0 train, 1 valid, 2 test) -- all [num_rows]

`user` / `item` in the interactions are row indices into the entity tables, so a batch is a
gather of entity rows. Field values are vocabulary ids: 0 is the unknown / rare value, 1.. are
values seen in the training split.

A store is written into a temporary sibling directory and renamed into place only once every
file and the manifest are on disk, so an interrupted prepare never leaves a directory that
`open_store` would take for complete (the manifest is the completeness marker and is written
last, inside the temporary directory).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

FORMAT_VERSION = 1
SPLITS = {"train": 0, "valid": 1, "test": 2}
INTERACTION_COLUMNS = {
    "user": np.int32, "item": np.int32, "scenario": np.int32, "label": np.float32, "split": np.int8,
}


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One categorical feature field of a tower.

    Attributes:
      name: field name, e.g. ``"user_id"`` or ``"genres"``.
      vocab_size: number of ids including the unknown id 0 (ids lie in ``[0, vocab_size)``).
      multi_hot: 0 for a single id per row (column ``int32 [N]``); otherwise the padded length L
        of a multi-hot field (column ``int32 [N, L]`` with a ``bool [N, L]`` mask).
    """
    name: str
    vocab_size: int
    multi_hot: int = 0


class DataError(ValueError):
    """Raised for malformed input data; the message names the file, line and field."""


class Rejects:
    """Row-rejection accounting under the ``config.data.on_error`` policy (SPEC section 4).

    'strict' raises DataError naming ``path:lineno`` and the detail; 'skip' counts the rows in
    ``counts[key][reason]`` (written to the manifest's ``rows_rejected``), so a run never drops
    data silently. The key is the file's path relative to ``root`` when given (two folders of
    one data set may both hold a ``train.txt``), else the file name.
    Raises ValueError for a policy other than 'strict' / 'skip'.
    """

    def __init__(self, policy: str, root: str | os.PathLike | None = None):
        if policy not in ("strict", "skip"):
            raise ValueError(f"config.data.on_error must be 'strict' or 'skip', got {policy!r}")
        self.policy = policy
        self.root = Path(root) if root is not None else None
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def key(self, path) -> str:
        """The manifest key of ``path``."""
        if self.root is not None:
            try:
                return Path(path).relative_to(self.root).as_posix()
            except ValueError:
                pass
        return Path(path).name

    def reject(self, path, lineno: int, reason: str, detail: str, count: int = 1):
        """Reject ``count`` rows, the first at ``lineno``: raise DataError (strict) or count."""
        if self.policy == "strict":
            raise DataError(f"{path}:{lineno}: {detail} (set config.data.on_error='skip' "
                            "to count and drop such rows)")
        self.counts[self.key(path)][reason] += count

    def reject_rows(self, path, bad: np.ndarray, linenos: np.ndarray, reason: str,
                    detail) -> np.ndarray:
        """Vectorised rejection: ``bad`` bool [n] over rows with source line numbers ``linenos``.

        ``detail(i)`` describes row i. Strict: raises on the first bad row. Returns ``~bad``.
        """
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            self.reject(path, int(linenos[first]), reason, detail(first), count=int(bad.sum()))
        return ~bad

    def as_dict(self) -> dict:
        """``{key: {reason: count}}`` for the manifest."""
        return {k: dict(v) for k, v in self.counts.items()}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (for the manifest's source checksums)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


@dataclasses.dataclass
class PreparedData:
    """An opened store; every array is a read-only memory map.

    Attributes:
      path: the store directory.
      manifest: the parsed manifest.json.
      scenario_names: K scenario names; scenario id k indexes this list.
      user_specs / item_specs: the fields of each tower, in model order.
      users / items: field name -> int32 [num_entities] or [num_entities, L].
      user_masks / item_masks: multi-hot field name -> bool [num_entities, L].
      inter: interaction column -> [num_rows] array (see INTERACTION_COLUMNS).
      user_raw_ids / item_raw_ids: [num_entities] the source's raw ids (str), for export and
        recommend.
    """
    path: Path
    manifest: dict
    scenario_names: list[str]
    user_specs: list[FieldSpec]
    item_specs: list[FieldSpec]
    users: dict[str, np.ndarray]
    items: dict[str, np.ndarray]
    user_masks: dict[str, np.ndarray]
    item_masks: dict[str, np.ndarray]
    inter: dict[str, np.ndarray]
    user_raw_ids: np.ndarray
    item_raw_ids: np.ndarray

    @property
    def num_scenarios(self) -> int:
        return len(self.scenario_names)

    @property
    def num_users(self) -> int:
        return int(self.manifest["num_users"])

    @property
    def num_items(self) -> int:
        return int(self.manifest["num_items"])

    def rows(self, split: str, labeled_positive: bool | None = None) -> np.ndarray:
        """int64 [n] indices of interaction rows in ``split`` ('train'|'valid'|'test').

        labeled_positive: None for all rows, True for label == 1 rows, False for label == 0 rows.
        Raises KeyError for an unknown split name.
        """
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
        m = self.inter["split"] == SPLITS[split]
        if labeled_positive is not None:
            m &= (self.inter["label"] > 0.5) == labeled_positive
        return np.flatnonzero(m)


def _save_table(dirpath: Path, cols: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray]):
    dirpath.mkdir(parents=True, exist_ok=True)
    for name, arr in cols.items():
        np.save(dirpath / f"{name}.npy", np.ascontiguousarray(arr))
    for name, arr in masks.items():
        np.save(dirpath / f"{name}.mask.npy", np.ascontiguousarray(arr, dtype=bool))


def write_store(path: str | os.PathLike, *, scenario_names: list[str],
                user_specs: list[FieldSpec], item_specs: list[FieldSpec],
                users: Mapping[str, np.ndarray], items: Mapping[str, np.ndarray],
                user_masks: Mapping[str, np.ndarray], item_masks: Mapping[str, np.ndarray],
                inter: Mapping[str, np.ndarray], user_raw_ids: np.ndarray,
                item_raw_ids: np.ndarray, extra_manifest: Mapping[str, Any]) -> Path:
    """Write a complete store atomically (temp dir + rename) and return its path.

    Validates that every column has the row count of its table, that ids lie in
    ``[0, vocab_size)``, that interaction user / item / scenario indices are in range, and that
    the interaction columns have the dtypes of INTERACTION_COLUMNS. Raises DataError on any
    violation, leaving nothing at ``path``. An existing store at ``path`` is replaced.
    """
    path = Path(path)
    num_users = len(next(iter(users.values())))
    num_items = len(next(iter(items.values())))
    for table, specs, cols, masks, n in (("users", user_specs, users, user_masks, num_users),
                                         ("items", item_specs, items, item_masks, num_items)):
        for s in specs:
            a = cols[s.name]
            if a.shape[0] != n:
                raise DataError(f"{table}.{s.name}: {a.shape[0]} rows, expected {n}")
            if a.size and (a.min() < 0 or a.max() >= s.vocab_size):
                raise DataError(f"{table}.{s.name}: ids outside [0, {s.vocab_size})")
            if s.multi_hot and (a.ndim != 2 or a.shape[1] != s.multi_hot
                                or masks[s.name].shape != a.shape):
                raise DataError(f"{table}.{s.name}: multi-hot column must be [N, {s.multi_hot}] "
                                f"with a mask of the same shape, got {a.shape}")
    n_rows = len(inter["user"])
    for c, dt in INTERACTION_COLUMNS.items():
        if c not in inter or inter[c].shape != (n_rows,) or inter[c].dtype != dt:
            raise DataError(f"interactions.{c}: expected {np.dtype(dt).name} [{n_rows}]")
    for c, hi in (("user", num_users), ("item", num_items), ("scenario", len(scenario_names))):
        if n_rows and (inter[c].min() < 0 or inter[c].max() >= hi):
            raise DataError(f"interactions.{c}: index outside [0, {hi})")

    manifest = {
        "format_version": FORMAT_VERSION,
        "scenario_names": list(scenario_names),
        "num_users": num_users,
        "num_items": num_items,
        "num_interactions": n_rows,
        "user_fields": [dataclasses.asdict(s) for s in user_specs],
        "item_fields": [dataclasses.asdict(s) for s in item_specs],
        "split_counts": {k: int((inter["split"] == v).sum()) for k, v in SPLITS.items()},
        "positives_by_split_scenario": {
            k: [int(((inter["split"] == v) & (inter["scenario"] == s) & (inter["label"] > 0.5)).sum())
                for s in range(len(scenario_names))] for k, v in SPLITS.items()},
        **dict(extra_manifest),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _save_table(tmp / "users", users, user_masks)
        _save_table(tmp / "items", items, item_masks)
        _save_table(tmp / "interactions", inter, {})
        np.save(tmp / "users" / "raw_id.npy", np.asarray(user_raw_ids).astype(str))
        np.save(tmp / "items" / "raw_id.npy", np.asarray(item_raw_ids).astype(str))
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def is_complete(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a store written to the end (its manifest exists)."""
    return (Path(path) / "manifest.json").is_file()


def open_store(path: str | os.PathLike) -> PreparedData:
    """Open a prepared store with every column memory-mapped read-only.

    Raises FileNotFoundError (naming the directory) if there is no complete store at ``path``,
    and DataError if the manifest's format version is not FORMAT_VERSION.
    """
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"no prepared data set at {path} (manifest.json missing); "
                                "run --mode prepare first")
    with open(path / "manifest.json") as f:
        manifest = json.load(f)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}/manifest.json: format_version {manifest.get('format_version')}, "
                        f"expected {FORMAT_VERSION}; prepare the data again")
    user_specs = [FieldSpec(**d) for d in manifest["user_fields"]]
    item_specs = [FieldSpec(**d) for d in manifest["item_fields"]]

    def load(table, specs):
        cols = {s.name: np.load(path / table / f"{s.name}.npy", mmap_mode="r") for s in specs}
        masks = {s.name: np.load(path / table / f"{s.name}.mask.npy", mmap_mode="r")
                 for s in specs if s.multi_hot}
        return cols, masks

    users, user_masks = load("users", user_specs)
    items, item_masks = load("items", item_specs)
    inter = {c: np.load(path / "interactions" / f"{c}.npy", mmap_mode="r")
             for c in INTERACTION_COLUMNS}
    return PreparedData(path=path, manifest=manifest, scenario_names=manifest["scenario_names"],
                        user_specs=user_specs, item_specs=item_specs, users=users, items=items,
                        user_masks=user_masks, item_masks=item_masks, inter=inter,
                        user_raw_ids=np.load(path / "users" / "raw_id.npy"),
                        item_raw_ids=np.load(path / "items" / "raw_id.npy"))


def random_split(n: int, fractions, seed: int) -> np.ndarray:
    """int8 [n] split ids (0 train, 1 valid, 2 test): a seeded permutation of the rows cut into
    ``round(f_train * n)`` train rows, ``round(f_valid * n)`` valid rows and the rest test.

    Raises ValueError unless ``fractions`` are 3 non-negative numbers summing to 1.
    """
    frac = np.asarray(fractions, dtype=np.float64)
    if frac.shape != (3,) or np.any(frac < 0) or abs(frac.sum() - 1) > 1e-6:
        raise ValueError(f"config.data.split must be 3 fractions summing to 1, got {tuple(frac)}")
    perm = np.random.default_rng(seed).permutation(n)
    n_train, n_valid = int(round(frac[0] * n)), int(round(frac[1] * n))
    split = np.empty(n, np.int8)
    split[perm[:n_train]] = 0
    split[perm[n_train:n_train + n_valid]] = 1
    split[perm[n_train + n_valid:]] = 2
    return split


def build_vocab(train_values, min_count: int = 1) -> dict:
    """Vocabulary from training-split values: value -> id in 1..V-1 (0 is unknown / rare).

    Values are ordered by decreasing count then by value, so ids are deterministic. Values seen
    fewer than ``min_count`` times map to 0. Returns a dict; vocab_size is ``len(vocab) + 1``.
    """
    vals, counts = np.unique(np.asarray(train_values), return_counts=True)
    keep = counts >= min_count
    vals, counts = vals[keep], counts[keep]
    order = np.lexsort((vals, -counts))
    return {v.item() if hasattr(v, "item") else v: i + 1 for i, v in enumerate(vals[order])}


def apply_vocab(values, vocab: dict) -> np.ndarray:
    """Map values to int32 ids with ``vocab``; values not in it get 0."""
    return np.fromiter((vocab.get(v.item() if hasattr(v, "item") else v, 0) for v in values),
                       dtype=np.int32, count=len(values))
