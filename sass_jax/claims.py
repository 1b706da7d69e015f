"""SASS's three claims, each tested on synthetic data built so that its mechanism should matter.

Usage::

  python -m sass_jax.claims --workdir W --seeds 5 [--claims a,b,c] [--size small|full]
      [--results results] [--claims a --data KEY=VALUE ... --setting NAME]

writes ``<results>/claims.md`` and ``claims.json`` (with ``--data``: one claim on a data
setting of your own, written to ``claims_<NAME>.md`` / ``.json``). The claims (Zhang et al.,
CIKM 2022; docs/design.md):

- (a) fine-grained transfer through the ML-SAT gates: scenarios that share part of their
  preference structure, one of them sparse (few training labels): SASS with gates > gates off
  (``gate_style='none'``) > separate per-scenario towers (``dssm_single``) in the sparse one;
- (b) entire-space pre-training: many unlabelled exposures that carry preference signal
  (``exposure_signal``), few clicks: SASS (pre-trained on all exposures, ``pairs='user_item'``)
  > SASS-Base, the gain shrinking as the labelled fraction of training clicks grows;
- (c) scenario-specific item vectors: items whose appeal differs by scenario item by item:
  SASS-Base > the same with one item vector for all scenarios (``model.item_scenario=
  'agnostic'``), by more when the vector is too narrow to hold every scenario's part (out_dim 4)
  than when it is wide enough (16); control: items without scenario-specific appeal, where the
  two should be level.

Every claim is data (``CLAIMS``): its settings (data overrides of ``configs/synthetic.py`` and
whether the setting expects an order or a level control), the variants compared
(``sass_jax.tuning`` variants plus overrides), the deciding scenario and the expected order.
Each (setting, variant, seed) is one ``sass_jax.train.loop.train`` run in
``W/<claim>/<setting>/<variant>/seed<s>`` (the data and parameter seed is s; a run whose
``metrics.json`` exists is read back, not retrained), scored by Recall@50 on the test split.
Claims a and b choose each run's fine-tuning length on the validation split
(``Claim.select_steps``: early stopping over one 400-step schedule), so that runs with few
labels are not judged after over-fitting them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from configs import synthetic
from configs import test as test_config
from sass_jax import tuning

log = logging.getLogger("sass_jax")

METRIC = "recall@50"


@dataclasses.dataclass(frozen=True)
class Setting:
  """One data setting of a claim: ``data`` overrides ``config.data`` (after the size's rows,
  users and items, so a setting may pin its own); ``overrides`` (config path -> value) apply to
  every variant, after the variant's own; ``kind`` 'order' (the claim's expected order should
  hold) or 'control' (the first two variants should be level within ``tolerance``)."""

  name: str
  data: dict[str, Any]
  kind: str = "order"
  tolerance: float = 0.0
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Claim:
  """A claim: ``variants`` (label, tuning variant, extra config overrides) in the expected
  order, best first; ``scenario`` decides ('overall' or a scenario name like 's0')."""

  key: str
  title: str
  variants: tuple[tuple[str, str, dict[str, Any]], ...]
  settings: tuple[Setting, ...]
  scenario: str = "overall"
  note: str = ""
  # Fine-tuning length chosen on validation (early stopping), per run: () = the size's
  # ``steps``; else each run fine-tunes max(select_steps) steps, keeps a checkpoint at each
  # listed step, scores each on the validation split and is reported on the test split at the
  # step with the best validation recall@50 of the deciding scenario (``run_one``).
  select_steps: tuple[int, ...] = ()


NO_PRE = {"pretrain.num_steps": 0}
# Claim c: room in the embeddings for an item's appeal in every scenario (32 >= 4 latent dims x
# (1 + 3 scenarios)).
WIDE_ITEMS = {"model.embed_dim": 32}
# Claim c's data: an own N(0, 2^2 I_4) part per (item, scenario) beside the shared 4-dim item
# vector, and more clicks per (item, scenario) than the claims sizes give (300 items, 120,000
# rows, 400 steps, whatever --size), so that the per-scenario part is learnable at all.
ITEMS_OWN = dict(
  latent_dim=4,
  item_scenario_strength=0.0,
  popularity_shared=1.0,
  num_items=300,
  num_users=900,
  num_rows=120_000,
)
CLAIMS: dict[str, Claim] = {
  "a": Claim(
    "a",
    "fine-grained transfer (ML-SAT gates) into a sparse scenario",
    (
      ("sass_base", "sass_base", {}),
      ("sass_base_no_gates", "sass_base_no_gates", {}),
      ("dssm_single", "dssm_single", {}),
    ),
    (
      Setting(
        "sparse_s0",
        # s0: a third of the rows of s1 / s2 and 5% of its training clicks kept; the test
        # split keeps every click (a measurable test set for the sparse scenario).
        dict(scenario_weights=(0.35, 1.0, 1.0), label_fraction=(0.05, 1.0, 1.0)),
      ),
    ),
    scenario="s0",
    note=(
      "all three without pre-training (the gates are compared, not stage 1). Each run "
      "fine-tunes for the number of steps its validation recall@50 in s0 picks from "
      "(25, 50, 100, 200, 400) (early stopping, one 400-step schedule). Not shown: with 10 "
      "seeds gates on minus gates off is -0.0003 +- 0.0223 in s0, and five other data settings "
      "(more s0 test clicks, 1% labels, more shared structure, an s0 that has the shared "
      "preference alone) gave no gain beyond noise either (results/claim_a_gates.md)"
    ),
    select_steps=(25, 50, 100, 200, 400),
  ),
  "b": Claim(
    "b",
    "entire-space pre-training with few labels",
    (("sass", "sass_user_item", {}), ("sass_base", "sass_base", {})),
    tuple(
      Setting(f"labels_{f:g}", dict(exposure_signal=1.5, label_fraction=f))
      for f in (0.02, 0.05, 0.2, 1.0)
    ),
    note=(
      "exposures drawn ~ popularity * exp(1.5 z); label_fraction = training clicks kept. "
      "Each run fine-tunes for the number of steps its validation recall@50 picks from "
      "(25, 50, 100, 200, 400) (early stopping, one 400-step schedule): with a fixed 200 steps, the "
      "runs with 2-5% of the clicks over-fit them (3 seeds: both variants 0.03-0.07 below their "
      "50-step runs) and the gain read at 200 steps did not shrink (+0.008, +0.015, +0.004 at 5%, "
      "20%, 100%)"
    ),
    select_steps=(25, 50, 100, 200, 400),
  ),
  "c": Claim(
    "c",
    "scenario-specific item vectors",
    (
      ("sass_base", "sass_base", WIDE_ITEMS),
      ("sass_base_agnostic_items", "sass_agnostic_items", {**NO_PRE, **WIDE_ITEMS}),
    ),
    (
      Setting(
        "items_own_narrow",
        dict(ITEMS_OWN, item_scenario_noise=2.0),
        overrides={"model.out_dim": 4, "train.num_steps": 400},
      ),
      Setting(
        "items_own_wide",
        dict(ITEMS_OWN, item_scenario_noise=2.0),
        overrides={"model.out_dim": 16, "train.num_steps": 400},
      ),
      Setting(
        "control_items_same",
        dict(ITEMS_OWN, item_scenario_noise=0.0),
        kind="control",
        tolerance=0.02,
        overrides={"model.out_dim": 4, "train.num_steps": 400},
      ),
    ),
    note=(
      "both without pre-training, embed_dim 32. items_own_*: an own N(0, 2^2 I_4) part per "
      "(item, scenario) on top of the shared 4-dim item vector (item_scenario_noise 2), so the "
      "item's vector in scenario k is b_i + e_ik: per scenario 4 numbers, across the 3 scenarios "
      "16. narrow: out_dim 4, which one vector per scenario fills exactly and one vector for all "
      "scenarios cannot; wide: out_dim 16, enough room for one vector to hold every scenario's "
      "part (the user vector of scenario k can then pick its slice), so the gain should shrink. "
      "control_items_same: no own part (out_dim 4). Tried before and not held (the earlier "
      "results/claims.md): an own N(0, I_8) part at out_dim 16 with 600 items and 60,000 rows "
      "(about 8 clicks per (item, scenario): +0.002 +- 0.006), and the generator's structured "
      "item part (cluster offsets + linear maps), which a scenario-aware user vector can absorb"
    ),
  ),
}

SIZES = {
  "small": dict(rows=40_000, users=600, items=400, steps=150, psteps=150),
  "full": dict(rows=60_000, users=900, items=600, steps=200, psteps=200),
}
# Data shared by every claim (on top of configs/synthetic.py): flat popularity (so that
# preference, not popularity, decides the top-50), few clusters that the side fields reveal,
# and enough clicks per user to learn from at these sizes.
COMMON_DATA = dict(zipf_alpha=0.3, num_clusters=8, ctr=0.3)


def base_config(size: str = "small"):
  """configs/synthetic.py with the tiny test model (configs/test.py) at a claims size."""
  if size not in SIZES:
    raise ValueError(f"--size {size!r}: expected one of {sorted(SIZES)}")
  z = SIZES[size]
  c = synthetic.get_config("sass")
  c.model = test_config.get_config("sass").model
  c.model.tau = 0.2
  c.model.vocab_pad_to = 256  # the same table shapes for every seed
  c.data.num_rows, c.data.num_users, c.data.num_items = z["rows"], z["users"], z["items"]
  for k, v in COMMON_DATA.items():
    c.data[k] = v
  c.train.num_steps, c.train.batch_size, c.train.warmup_steps = z["steps"], 256, 20
  c.train.learning_rate = 3e-3
  c.pretrain.num_steps, c.pretrain.batch_size = z["psteps"], 256
  c.checkpoint.every_steps = 100_000
  c.eval.ks = (50,)
  return c


def run_config(claim: Claim, setting: Setting, variant: tuple, seed: int, size: str):
  """The config of one run (data seed = parameter seed = ``seed``)."""
  _, name, extra = variant
  c = base_config(size)
  for k, v in setting.data.items():
    c.data[k] = v
  c.data.seed = int(seed)
  c = tuning.run_config(c, name, {}, seed)
  for path, v in {**extra, **setting.overrides}.items():
    tuning._set(c, path, v)
  return c


def _recalls(m: dict) -> dict:
  out = {k: float(v[METRIC]) for k, v in m["scenarios"].items()}
  out["overall"] = float(m["overall"][METRIC])
  return out


def _train_selecting_steps(claim: Claim, cfg, wd: Path) -> dict:
  """Fine-tune ``max(claim.select_steps)`` steps with a checkpoint at each listed step, score
  each on the validation split, then the best (deciding scenario's recall@50; the earlier step
  on a tie) on the test split. Writes ``select_steps.json`` ({step: validation recall@50},
  the chosen step) and the test metrics to ``metrics.json`` last, so a run cut short leaves no
  metrics.json to be read back. Returns the test metrics."""
  import math

  from sass_jax.eval import evaluate as eval_lib
  from sass_jax.partition import Partitioner
  from sass_jax.train import loop

  grid = sorted(set(int(x) for x in claim.select_steps))
  cfg.train.num_steps = grid[-1]
  cfg.checkpoint.every_steps = math.gcd(*grid)
  cfg.checkpoint.max_to_keep = None
  loop.train(cfg, wd, evaluate=False, show_progress=False)
  data = loop.prepare(cfg, wd)
  model = loop.build_model(cfg, data)
  part = Partitioner(cfg.mesh)

  def score(step, split):
    variables, _ = loop.restore_variables_and_step(
      cfg, wd, "finetune", model, part, data, step=step
    )
    return eval_lib.evaluate(
      model,
      variables,
      data,
      split,
      tuple(cfg.eval.ks),
      cfg.eval.mask,
      cfg.eval.user_chunk,
      partitioner=part,
      corpus=cfg.eval.corpus,
    )

  valid = {s: _recalls(score(s, "valid"))[claim.scenario] for s in grid}
  best = max(grid, key=lambda s: (valid[s], -s))
  m = {"checkpoint_step": best, **score(best, "test")}
  (wd / "select_steps.json").write_text(
    json.dumps({"valid_" + METRIC: {str(k): v for k, v in valid.items()}, "chosen": best})
  )
  (wd / "metrics.json").write_text(json.dumps(m, indent=2))
  return m


def run_dir(workdir, claim: Claim, setting: Setting, variant: tuple, seed: int) -> Path:
  """``workdir/<claim>/<setting>/<variant label>/seed<seed>``: one run's directory."""
  return Path(workdir) / claim.key / setting.name / variant[0] / f"seed{seed}"


def run_one(claim, setting, variant, seed, size, workdir: Path) -> dict:
  """Train and evaluate one run (or read its metrics.json); returns {scenario: recall@50}
  (and 'steps': the fine-tuning step reported, with ``claim.select_steps``), 'reread': whether
  the run was read back, 'train_s': its own training and evaluation seconds (recorded in
  ``RUN_SECONDS`` when it ran; None for a run made before that file existed)."""
  from sass_jax.train import loop

  wd = run_dir(workdir, claim, setting, variant, seed)
  mfile = wd / "metrics.json"
  reread = mfile.exists()
  if reread:  # run_claims checked it was made with these settings
    m = json.loads(mfile.read_text())
    try:
      train_s = float(json.loads((wd / RUN_SECONDS).read_text())["train_s"])
    except (OSError, ValueError, KeyError, TypeError):
      train_s = None
  else:
    t = time.time()
    cfg = run_config(claim, setting, variant, seed, size)
    wd.mkdir(parents=True, exist_ok=True)
    (wd / RUN_CONFIG).write_text(json.dumps(_plain_config(cfg), indent=1, sort_keys=True))
    if claim.select_steps:
      m = _train_selecting_steps(claim, cfg, wd)
    else:
      m = loop.train(cfg, wd, show_progress=False)
    train_s = round(time.time() - t, 1)
    (wd / RUN_SECONDS).write_text(json.dumps({"train_s": train_s}))
    log.info("claims: %s/%s/%s/seed%d in %.0fs", claim.key, setting.name, variant[0], seed, train_s)
  out = _recalls(m)
  out["reread"], out["train_s"] = reread, train_s
  if claim.select_steps:
    out["steps"] = int(m["checkpoint_step"])
  return out


RUN_CONFIG = "claims_run_config.json"  # a run's config, written before it trains
RUN_SECONDS = "claims_run_seconds.json"  # {"train_s": ...}, written when it has finished
_DATA_IGNORED = ("dir", "download")  # where the data live, not what they are


class StaleRunError(ValueError):
  """A run directory holds a finished run made with other settings."""


def _plain_config(cfg) -> dict:
  return json.loads(json.dumps(cfg.to_dict(), default=str))


def _differences(there: dict, now: dict, prefix: str, every_key: bool) -> list[str]:
  """'path: X there, Y now' for each differing leaf; keys on one side only count when
  ``every_key`` (else a key a later code version added is not a difference)."""
  out = []
  for k in sorted(set(there) | set(now), key=str):
    if not every_key and (k not in there or k not in now):
      continue
    x, y = there.get(k, "<unset>"), now.get(k, "<unset>")
    if isinstance(x, dict) and isinstance(y, dict):
      out += _differences(x, y, f"{prefix}.{k}", every_key)
    elif x != y:
      out.append(f"{prefix}.{k}: {x!r} there, {y!r} now")
  return out


def check_finished_run(wd: Path, cfg) -> None:
  """Raise ``StaleRunError`` (one line) when the finished run in ``wd`` was made with other
  settings than ``cfg``: its recorded config (``RUN_CONFIG``) -- every ``config.data`` key,
  and the other values both configs have -- or, for a run from before that record, its data
  manifest's options. Re-reading such a run would label old numbers with new settings."""
  from sass_jax.data import store

  rec = wd / RUN_CONFIG
  if rec.exists():
    there = json.loads(rec.read_text())
    rest = lambda d: {k: v for k, v in d.items() if k != "data"}
    diffs = _differences(rest(there), rest(_plain_config(cfg)), "config", every_key=False)
    data_there = there.get("data", {})
  else:
    try:
      data_there = json.loads((wd / "data" / "manifest.json").read_text())["options"]
    except (OSError, ValueError, KeyError, TypeError):
      return  # nothing recorded to compare with
    diffs = []
  keep = lambda d: {k: v for k, v in d.items() if k not in _DATA_IGNORED}
  data_now = keep(store.data_options(cfg.data))
  diffs = _differences(keep(data_there), data_now, "config.data", every_key=True) + diffs
  if diffs:
    more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
    raise StaleRunError(
      f"{wd} holds a finished run made with other settings ({'; '.join(diffs[:3])}{more}); "
      "use another --workdir or --setting, or remove that directory to retrain it"
    )


def _ms(x) -> dict:
  x = np.asarray(x, np.float64)
  return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0}


def summarise(claim: Claim, setting: Setting, runs: dict[str, list[dict]]) -> dict:
  """Means, paired differences (every pair of variants, earlier minus later in the expected
  order; 'clear': the mean beyond 2 standard errors, std / sqrt(seeds)) and the verdict (an
  order holds when every consecutive mean difference is > 0)."""
  labels = [v[0] for v in claim.variants]
  sc = claim.scenario
  table = {
    lab: {
      "deciding": _ms([r[sc] for r in runs[lab]]),
      "overall": _ms([r["overall"] for r in runs[lab]]),
      # the fine-tuning step each seed reported (claim.select_steps), else absent
      **({"steps": [r["steps"] for r in runs[lab]]} if "steps" in runs[lab][0] else {}),
    }
    for lab in labels
  }
  if setting.kind == "order":
    pairs = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1 :]]
  else:
    pairs = [tuple(labels[:2])]
  diffs = {}
  for a, b in pairs:
    d = np.array([ra[sc] - rb[sc] for ra, rb in zip(runs[a], runs[b])])
    ms = _ms(d)
    diffs[f"{a} - {b}"] = {
      **ms,
      "positive_seeds": int((d > 0).sum()),
      "seeds": len(d),
      "clear": bool(len(d) > 1 and abs(ms["mean"]) > 2 * ms["std"] / np.sqrt(len(d))),
    }
  if setting.kind == "order":
    steps = [diffs[f"{a} - {b}"] for a, b in zip(labels, labels[1:])]
    held = all(v["mean"] > 0 for v in steps)
    clear = held and all(v["clear"] for v in steps)
    statement = (
      f"expected order {' > '.join(labels)} in {sc}: "
      + ("HELD" if held else "NOT held")
      + " (criterion: every consecutive mean paired difference > 0)"
      + ("; each beyond 2 standard errors" if clear else "")
      + ("; not every step beyond 2 standard errors" if held and not clear else "")
    )
  else:
    (v,) = diffs.values()
    held = abs(v["mean"]) <= setting.tolerance
    statement = (
      f"control: {labels[0]} and {labels[1]} level in {sc} within {setting.tolerance:g}: "
      + ("HELD" if held else "NOT held")
    )
  return {
    "setting": setting.name,
    "kind": setting.kind,
    "data": {k: list(v) if isinstance(v, tuple) else v for k, v in setting.data.items()},
    "overrides": dict(setting.overrides),
    "scenario": sc,
    "table": table,
    "paired_differences": diffs,
    "held": bool(held),
    "statement": statement,
    "runs": runs,
  }


@contextlib.contextmanager
def compile_cache(path):
  """JAX's persistent compilation cache in ``path`` while inside (the previous settings after):
  the tables are padded alike for every seed (``vocab_pad_to``), so most steps compile once per
  claim instead of once per run (a run takes about a third of the time)."""
  import jax

  try:  # private: the cache is set up once per process, so it must be reset to take a new dir
    from jax._src import compilation_cache as cc

    reset = cc.reset_cache
  except (ImportError, AttributeError):  # another jax: run without the cache (only slower)
    yield
    return
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  old = {k: getattr(jax.config, k) for k in keys}
  jax.config.update(keys[0], str(path))
  jax.config.update(keys[1], 0.0)
  reset()
  try:
    yield
  finally:
    for k, v in old.items():
      jax.config.update(k, v)
    reset()


def run_claims(
  workdir, keys=("a", "b", "c"), seeds=5, size="full", only=None, settings=None
) -> dict:
  """Every (claim, setting, variant, seed) run (under ``compile_cache(workdir/jax_cache)``);
  ``only``: setting names to run (None: all); ``settings``: a tuple of ``Setting`` that replaces
  each run claim's own (the CLI's ``--data``). Returns the results dict of ``claims.json``."""
  with compile_cache(Path(workdir) / "jax_cache"):
    return _run_claims(workdir, keys, seeds, size, only, settings)


def _run_claims(workdir, keys, seeds, size, only, settings=None) -> dict:
  t0 = time.time()
  out = {
    "size": size,
    "sizes": SIZES[size],
    "ran": list(keys),
    "seeds": list(range(seeds)),
    "metric": METRIC,
    "claims": {},
  }
  claims = {
    k: CLAIMS[k] if settings is None else dataclasses.replace(CLAIMS[k], settings=tuple(settings))
    for k in keys
  }
  # Every finished run that would be re-read is checked first, before any training.
  for claim in claims.values():
    for setting in claim.settings:
      if only is not None and setting.name not in only:
        continue
      for s, v in ((s, v) for s in range(seeds) for v in claim.variants):
        wd = run_dir(workdir, claim, setting, v, s)
        if (wd / "metrics.json").exists():
          check_finished_run(wd, run_config(claim, setting, v, s, size))
  for key in keys:
    t1 = time.time()
    claim = claims[key]
    res, done = [], []
    for setting in claim.settings:
      if only is not None and setting.name not in only:
        continue
      runs = {v[0]: [] for v in claim.variants}
      for s in range(seeds):
        for v in claim.variants:
          runs[v[0]].append(run_one(claim, setting, v, s, size, Path(workdir)))
      done += [r for rs in runs.values() for r in rs]
      res.append(summarise(claim, setting, runs))
      res[-1]["ran_with"] = ran_with(claim, setting, size)
    extra = {}
    if key == "b":  # the gain should shrink as labels grow
      gains = [r["paired_differences"]["sass - sass_base"]["mean"] for r in res]
      extra["gain_shrinks"] = (
        bool(all(x > y for x, y in zip(gains, gains[1:]))) if len(gains) > 1 else None
      )
      extra["gains"] = gains
    out["claims"][key] = {
      "title": claim.title,
      "note": claim.note,
      "variants": [{"label": a, "variant": b, "overrides": c} for a, b, c in claim.variants],
      "settings": res,
      **extra,
      "wall_s": round(time.time() - t1, 1),
      **_run_times(done),
    }
  out["wall_s"] = round(time.time() - t0, 1)
  return out


def ran_with(claim: Claim, setting: Setting, size: str) -> dict:
  """What a setting's runs were made with once the size, the setting and the claim's variants'
  shared overrides are applied: data rows / users / items and the two stages' steps
  (the fine-tuning steps are those chosen from, with ``claim.select_steps``; the pre-training
  steps of the variants that pre-train, 0 when none does)."""
  c = run_config(claim, setting, claim.variants[0], 0, size)
  psteps = max(run_config(claim, setting, v, 0, size).pretrain.num_steps for v in claim.variants)
  steps = list(claim.select_steps) if claim.select_steps else c.train.num_steps
  return {
    "num_rows": c.data.num_rows,
    "num_users": c.data.num_users,
    "num_items": c.data.num_items,
    "finetune_steps": steps,
    "pretrain_steps": psteps,
  }


def _run_times(done: list[dict]) -> dict:
  """How many of a claim's runs were read back from earlier calls, and the runs' own
  training seconds summed (None when a read-back run did not record its own)."""
  secs = [r.get("train_s") for r in done]
  return {
    "runs": len(done),
    "runs_reread": sum(bool(r.get("reread")) for r in done),
    "runs_train_s": None if None in secs else round(sum(secs), 1),
  }


def merge_previous(res: dict, path: Path) -> dict:
  """``res`` plus the claims of an earlier ``claims.json`` at ``path`` that ``res`` did not run,
  when that file has the same size and seeds (so ``--claims c`` updates claim c and keeps a and
  b). Each claim keeps its own ``wall_s`` (None when the earlier file did not record it per
  claim); ``wall_s`` stays this run's. A missing, unreadable or different file is ignored."""
  try:
    old = json.loads(Path(path).read_text())
  except (OSError, ValueError):
    return res
  if old.get("size") != res["size"] or old.get("seeds") != res["seeds"]:
    return res
  merged = {}
  for key in CLAIMS:
    if key in res["claims"]:
      merged[key] = res["claims"][key]
    elif key in old.get("claims", {}):
      merged[key] = {"wall_s": None, **old["claims"][key]}
  res["claims"] = merged
  return res


def _pm(x: dict, one_seed: bool, sign: str = "") -> str:
  """'mean ± std', or the mean alone for one seed (no std to show)."""
  m = f"{x['mean']:{sign}.4f}"
  return m if one_seed else f"{m} ± {x['std']:.4f}"


def markdown(res: dict) -> str:
  """``claims.md``: per claim and setting a table of mean ± std over seeds and the verdicts
  (the mean alone with one seed)."""
  ran = res.get("ran") or list(CLAIMS)
  one = len(res["seeds"]) == 1
  only = f" --claims {','.join(ran)}" if ran != list(CLAIMS) else ""
  L = [
    "# SASS's claims on planted synthetic data",
    "",
    f"`python -m sass_jax.claims --workdir W --size {res['size']} --seeds {len(res['seeds'])}{only}"
    f"{res.get('cli_extra', '')}` "
    f"({res['sizes']}; a setting may pin its own: its 'Ran with' line says what it used); "
    f"{res['metric']} on the test split, mean ± std over seeds "
    f"{res['seeds']} (each seed: new data and new initialisation); paired differences are "
    f"per seed. Wall time of the last run {res['wall_s']:.0f} s (per claim below). Definitions: "
    "`sass_jax/claims.py`.",
    "",
  ]
  for key, c in res["claims"].items():
    wall = (
      f" Wall time {c['wall_s']:.0f} s."
      if c.get("wall_s") is not None
      else " Kept from an earlier run of this file (same size and seeds; possibly older code)."
    )
    if c.get("wall_s") is not None and c.get("runs_reread"):
      own = c.get("runs_train_s")
      own = f"; the runs' own training took {own:.0f} s" if own is not None else ""
      wall += (
        f" {c['runs_reread']} of its {c['runs']} runs were read back from earlier calls, not"
        f" trained by this one{own}."
      )
    L += [f"## ({key}) {c['title']}", "", c["note"] + "." + wall, ""]
    for s in c["settings"]:
      sc = s["scenario"]
      over = f"; config {s['overrides']}" if s.get("overrides") else ""
      L += [f"### {s['setting']} ({s['kind']}): data {s['data']}{over}", ""]
      if s.get("ran_with"):
        w = s["ran_with"]
        L += [
          f"Ran with {w['num_rows']:,} rows, {w['num_users']:,} users, {w['num_items']:,} items;"
          f" fine-tuning steps {w['finetune_steps']}"
          + (f", pre-training steps {w['pretrain_steps']}." if w["pretrain_steps"] else "."),
          "",
        ]
      dec = f"{METRIC} ({sc})" if sc != "overall" else f"{METRIC} (deciding: overall)"
      steps = all("steps" in t for t in s["table"].values())
      sh = " fine-tuning steps chosen on validation (per seed) |" if steps else ""
      L += [
        f"| variant | {dec} | {METRIC} (overall) |{sh}",
        "|---|---|---|" + ("---|" if steps else ""),
      ]
      for lab, t in s["table"].items():
        d, o = t["deciding"], t["overall"]
        st = f" {', '.join(map(str, t['steps']))} |" if steps else ""
        L.append(f"| {lab} | {_pm(d, one)} | {_pm(o, one)} |{st}")
      L += [
        "",
        f"| paired difference ({sc}) | mean ± std | seeds > 0 | beyond 2 s.e. |",
        "|---|---|---|---|",
      ]
      for name, d in s["paired_differences"].items():
        L.append(
          f"| {name} | {_pm(d, one, '+')} | {d['positive_seeds']}/{d['seeds']} "
          f"| {'yes' if d['clear'] else 'no'} |"
        )
      L += ["", f"**{s['statement']}**", ""]
    if c.get("gain_shrinks") is not None:
      g = ", ".join(f"{x:+.4f}" for x in c["gains"])
      L += [
        f"Gain of pre-training by labelled fraction ({', '.join(s['setting'] for s in c['settings'])}): "
        f"{g}; shrinks as labels grow: **{'yes' if c['gain_shrinks'] else 'no'}**",
        "",
      ]
  return "\n".join(L)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(
    prog="python -m sass_jax.claims",
    description=__doc__.split("\n\n")[0],
    epilog="claims (definitions and expected orders: the sass_jax.claims module docstring):\n"
    + "\n".join(
      f"  {k} = {c.title}\n      settings: {', '.join(s.name for s in c.settings)}"
      for k, c in CLAIMS.items()
    ),
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  ap.add_argument("--workdir", required=True, help="run directories (a finished run is re-read)")
  ap.add_argument(
    "--seeds", type=int, default=5, help="seeds 0 .. seeds - 1 per variant (>= 1; default 5)"
  )
  ap.add_argument(
    "--claims",
    default="a,b,c",
    help="comma-separated subset of a, b, c, each once (a: ML-SAT gates, b: entire-space "
    "pre-training, c: scenario-specific item vectors; see below; default a,b,c)",
  )
  ap.add_argument(
    "--size",
    default="full",
    choices=sorted(SIZES),
    help="rows, users, items, steps: "
    + "; ".join(f"{k} {v}" for k, v in SIZES.items())
    + " (default full)",
  )
  ap.add_argument(
    "--results",
    default="results",
    help="where claims.md / claims.json go (the repository's results/ by default; claims not "
    "run are kept from an existing claims.json of the same size and seeds)",
  )
  ap.add_argument(
    "--data",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="repeatable; with one claim: run it on one data setting of your own instead of its "
    "settings, with these config.data values (Python literals, e.g. "
    "'label_fraction=(0.03,1,1)', on top of the claims' common data and the size); the "
    "results go to <results>/claims_<setting>.md / .json (claims.* are left alone). Keys: the "
    "synthetic generator's options, docs/design.md §4 (all but seed, which each run sets): "
    + ", ".join(_data_keys()),
  )
  ap.add_argument(
    "--setting",
    default=None,
    help="with --data: the setting's name, its runs' directory under WORKDIR/<claim>/ "
    "(letters, digits, '.', '_', '-', starting with a letter or digit; default custom)",
  )
  a = ap.parse_args(argv)
  keys = [k.strip() for k in a.claims.split(",")]
  if any(k not in CLAIMS for k in keys) or len(set(keys)) != len(keys):
    ap.error(
      f"--claims {a.claims!r}: expected a non-empty subset of {sorted(CLAIMS)}, comma-separated, "
      "each once, no empty element"
    )
  if a.seeds < 1:
    ap.error(f"--seeds {a.seeds}: expected an integer >= 1")
  for flag, path in (("--results", a.results), ("--workdir", a.workdir)):
    if Path(path).exists() and not Path(path).is_dir():
      ap.error(f"{flag} {path!r}: exists and is not a directory")
  settings, stem = None, "claims"
  if a.setting is not None and not a.data:
    ap.error(f"--setting {a.setting!r} without --data: it names a --data setting")
  if a.data:
    name = "custom" if a.setting is None else a.setting
    if not (name[:1].isalnum() and all(ch.isalnum() or ch in "._-" for ch in name)):
      ap.error(
        f"--setting {name!r}: expected a name of letters, digits, '.', '_', '-', starting with "
        "a letter or digit"
      )
    if len(keys) != 1:
      ap.error(f"--data with --claims {a.claims!r}: expected one claim")
    try:
      settings = (Setting(name, parse_data(a.data)),)
      check_setting(CLAIMS[keys[0]], settings[0], a.size)
    except ValueError as e:
      ap.error(str(e))
    stem = f"claims_{name}"
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
  log.setLevel(logging.INFO)
  try:
    res = run_claims(a.workdir, keys, a.seeds, a.size, settings=settings)
  except StaleRunError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  if settings is not None:  # for the command line in the markdown
    res["cli_extra"] = (
      "".join(f" --data '{d}'" for d in a.data)
      + f" --setting {settings[0].name} --results {a.results}"
    )
  out = Path(a.results)
  out.mkdir(parents=True, exist_ok=True)
  if settings is None:
    res = merge_previous(res, out / "claims.json")
  (out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
  (out / f"{stem}.md").write_text(markdown(res) + "\n")
  print(markdown(res))


def parse_data(items) -> dict[str, Any]:
  """``['key=value', ...]`` (the CLI's ``--data``) as {key: value}: values are Python literals
  (``ast.literal_eval``; a string needs quotes), keys are the synthetic generator's
  options (``sass_jax.data.synthetic.DEFAULTS`` and ``KNOB_DEFAULTS``). Raises ValueError, one
  line naming the item."""
  import ast

  known = _data_keys()
  out = {}
  for item in items:
    key, eq, text = str(item).partition("=")
    key = key.strip()
    if not eq or not key:
      raise ValueError(f"--data {item!r}: expected KEY=VALUE")
    if key not in known:
      raise ValueError(f"--data {item!r}: unknown key {key!r}; expected one of {known}")
    if key in out:
      raise ValueError(f"--data {item!r}: {key!r} given twice")
    try:
      out[key] = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
      raise ValueError(
        f"--data {item!r}: {text.strip()!r} is not a Python literal (a string needs quotes: "
        f"{key}='...')"
      ) from None
  return out


def _data_keys() -> list[str]:
  """The keys ``--data`` takes: the synthetic generator's options but ``seed`` (each run sets
  it to its seed)."""
  from sass_jax.data import synthetic as gen

  return sorted({*gen.DEFAULTS, *gen.KNOB_DEFAULTS} - {"seed"})


def check_setting(claim: Claim, setting: Setting, size: str) -> None:
  """The checks the runs' data preparation would make, before any work: ValueError, one line
  naming the ``--data`` key (a value of the wrong type for the config) or ``config.data.<key>``
  (a value the generator rejects)."""
  from sass_jax.data import synthetic as gen

  base = base_config(size)
  for k, v in setting.data.items():
    try:
      base.data[k] = v
    except (TypeError, ValueError) as e:
      raise ValueError(f"--data {k}={v!r}: {str(e).splitlines()[0]}") from None
  for variant in claim.variants:
    gen.validate(run_config(claim, setting, variant, 0, size).data)


if __name__ == "__main__":
  main()
