"""Row-sparse updates of the embedding tables (docs/design.md §1-2, 6).

With the dense path (``config.train.embedding_optimizer='dense'``, the default and the
reference) every step computes a gradient of the shape of every table and AdamW reads and writes
every row of every table and of its two moment tables. This module keeps the Flax model as it
is and updates only the rows a batch touches:

1. For every table (``<side>_tower/embed/<field>``, ``[R, d]``) the batch's ids of that field
   (``[B]`` or ``[B, L]``) are deduplicated with ``jnp.unique(size=U)``, U = min(B * L, R) a
   static bound, padded with the out-of-range row R. The U rows are gathered (``[U, d]``; the
   padding gathers zeros) and the batch's ids are replaced by their positions in that buffer.
2. The unchanged model class is applied with a *view* config whose field vocabularies are the U
   buffer rows (``vocab_pad_to=1``), so its tables are the gathered ``[U, d]`` buffers: the
   gradient of each table is ``[U, d]`` (every occurrence of a row summed), never ``[R, d]``.
3. The other parameters get the stage's optax AdamW (``steps.make_optimizer``) as before; the
   table rows get a row-wise optimiser on those U rows only, scattered back with
   ``.at[uniq].set(mode='drop')`` into the donated buffers (updated in place by XLA):

   - ``'lazy_adam'``: Adam moments ``m, v`` ``[R, d]``; only touched rows are updated (a row's
     moments do not decay while it is absent). With count t = number of updates so far + 1::

       m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
       p = p - lr(t - 1) * (m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd * p)

     i.e. exactly optax.adamw's formula (b1 0.9, b2 0.999, eps 1e-8, decoupled weight decay
     ``weight_decay`` of the stage) applied to the touched rows; a row touched at every step
     follows dense AdamW.
   - ``'rowwise_adagrad'``: one accumulator per row ``a`` ``[R]`` (FBGEMM / TorchRec's
     row-wise Adagrad)::

       a = a + mean_j(g_j^2);  p = p - lr(t - 1) * (g / (sqrt(a) + eps) + wd * p)

"Touched" means every id in the batch's id arrays of that field -- those of the labelled
sub-batch ``batch['labelled']`` (``config.train.labelled_weight`` > 0) included: its ids are
de-duplicated together with the main batch's into one buffer -- masked multi-hot positions
included (their gradient is zero, but they are part of the index set). The learning rate is
the stage's schedule (``steps.make_schedule``) times ``config.train.embedding_learning_rate /
learning_rate`` when that is > 0.

Optimiser state (``TrainState.opt_state``; plain dicts, so orbax checkpoints it like any
pytree): ``{'dense': <optax state of the non-table params>, 'tables': {tower: {'embed': {field:
{'m', 'v'} | {'acc'}}}}, 'count': int32 []}``; the moment tables carry the table's logical axes
('vocab', 'embed') and the accumulators ('vocab',), so the partitioner shards them as the tables.
``TrainState.params`` keeps its layout: evaluation, export and restore are unchanged.

Metrics: ``loss``, ``grad_norm`` (of the non-table gradient and the row gradients: equal to the
dense gradient norm), ``param_norm`` (of the non-table params and the *touched rows* after the
update -- a full norm would read every table), ``touched_rows`` (distinct rows updated, summed
over the tables), and the loss's extras.

``masked=True`` (``SparseOptions``) is the dense lazy-update *reference*: the unchanged model,
a dense gradient, and the same row-wise rules applied to whole tables under a touched-row mask;
it must give the same touched rows (up to float summation order) and bitwise-unchanged others.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from sass_jax.model.embedding import padded_rows
from sass_jax.train import steps
from sass_jax.train.stages import stage_config

EMBEDDING_OPTIMIZERS = ("dense", "rowwise_adagrad", "lazy_adam")
SIDES = (("user", "user_tower"), ("item", "item_tower"))


@dataclasses.dataclass(frozen=True)
class SparseOptions:
  """How the embedding tables are updated (module docstring).

  kind: 'lazy_adam' or 'rowwise_adagrad'. learning_rate: schedule of the update count.
  weight_decay: decoupled, on touched rows. b1, b2, eps: Adam's; adagrad_eps: Adagrad's.
  masked: the dense lazy-update reference instead of the row-sparse path.
  batch_sharding: the batch's sharding on a mesh (``Partitioner.batch_sharding()``) or None.
    The positions of the batch's ids in the de-duplicated buffer come out of ``jnp.unique``
    replicated; they are constrained back to this sharding, so each device runs the towers on
    its share of the batch only (without it XLA ran the towers over the whole global batch on
    every device: docs/scaling.md).
  """

  kind: str
  learning_rate: Callable[[Any], Any]
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  adagrad_eps: float = 1e-8
  masked: bool = False
  batch_sharding: Any = None

  def __post_init__(self):
    if self.kind not in EMBEDDING_OPTIMIZERS[1:]:
      raise ValueError(
        f"config.train.embedding_optimizer={self.kind!r}; expected one of {EMBEDDING_OPTIMIZERS}"
      )


def options_from_config(
  train_cfg, stage_cfg, num_steps: int, masked: bool = False, batch_sharding=None
) -> SparseOptions | None:
  """The stage's SparseOptions, or None for ``config.train.embedding_optimizer='dense'``.

  ``config.train.embedding_optimizer`` applies to both stages; the learning rate follows the
  stage's schedule (``stage_cfg``: ``config.pretrain`` or ``config.train``), rescaled to
  ``config.train.embedding_learning_rate`` when that is > 0. Raises ValueError for an unknown
  optimiser name or a negative learning rate.
  """
  kind = str(train_cfg.embedding_optimizer)
  if kind not in EMBEDDING_OPTIMIZERS:
    raise ValueError(
      f"config.train.embedding_optimizer={kind!r}; expected one of {EMBEDDING_OPTIMIZERS}"
    )
  if kind == "dense":
    return None
  sched = steps.make_schedule(stage_cfg, num_steps)
  emb_lr = float(train_cfg.embedding_learning_rate or 0.0)
  if emb_lr < 0:
    raise ValueError(
      f"config.train.embedding_learning_rate={emb_lr}; expected >= 0 (0: the stage's learning_rate)"
    )
  if emb_lr > 0:
    base, scale = sched, emb_lr / float(stage_cfg.learning_rate)
    sched = lambda count: base(count) * scale
  return SparseOptions(
    kind=kind,
    learning_rate=sched,
    weight_decay=float(stage_cfg.weight_decay),
    masked=masked,
    batch_sharding=batch_sharding,
  )


# ---- tables ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Table:
  """One embedding table: ``path`` into params, the batch key ``side`` ('user' / 'item'), the
  ``field`` name, ``rows`` R and ``dim`` d of the ``[R, d]`` param, ``multi_hot`` length L."""

  path: tuple[str, ...]
  side: str
  field: str
  rows: int
  dim: int
  multi_hot: int


def _shape(x):
  return (x.value if isinstance(x, nn.LogicallyPartitioned) else x).shape


def find_tables(model: nn.Module, params) -> tuple[Table, ...]:
  """The field tables of a two-tower model's params (boxed or not).

  Supports models whose towers embed the batch ids directly with a ``FieldEmbedder`` named
  'embed' under 'user_tower' / 'item_tower' (SASS, SASS-Base and the baselines except
  ``dssm_single`` with separate embeddings). Raises ValueError naming the table otherwise.
  """
  mc = model.cfg
  flat = traverse_util.flatten_dict(params)
  out = []
  for side, tower in SIDES:
    for s in getattr(mc, f"{side}_specs"):
      path = (tower, "embed", s.name)
      want = padded_rows(s.vocab_size, mc.vocab_pad_to)
      if path not in flat or len(_shape(flat[path])) != 2 or _shape(flat[path])[0] != want:
        got = _shape(flat[path]) if path in flat else "missing"
        raise ValueError(
          f"config.train.embedding_optimizer (row-sparse) needs the table {'/'.join(path)} "
          f"of {want} rows addressed by the batch ids; model {type(model).__name__} has "
          f"{got}. Use embedding_optimizer='dense' for this model."
        )
      out.append(Table(path, side, s.name, want, _shape(flat[path])[1], s.multi_hot))
  return tuple(out)


def _unique_bound(t: Table, ids_shape) -> int:
  n = 1
  for x in ids_shape:
    n *= int(x)
  return max(1, min(n, t.rows))


def _view_model(model: nn.Module, sizes: dict[tuple[str, str], int]) -> nn.Module:
  """The same model class over tables of ``sizes[(side, field)]`` rows (no padding)."""
  mc = model.cfg
  specs = {
    side: tuple(
      dataclasses.replace(s, vocab_size=sizes[(side, s.name)]) for s in getattr(mc, f"{side}_specs")
    )
    for side, _ in SIDES
  }
  cfg = dataclasses.replace(mc, user_specs=specs["user"], item_specs=specs["item"], vocab_pad_to=1)
  return model.clone(cfg=cfg)


def split_params(params, tables: Sequence[Table]):
  """(the params without the tables, {path: table})."""
  flat = traverse_util.flatten_dict(params)
  tabs = {t.path: flat.pop(t.path) for t in tables}
  return traverse_util.unflatten_dict(flat), tabs


def merge_params(rest, tabs: dict):
  flat = traverse_util.flatten_dict(rest)
  flat.update(tabs)
  return traverse_util.unflatten_dict(flat)


# ---- optimiser state ------------------------------------------------------------------------
def table_state_init(kind: str, table):
  """Zero state of one (possibly boxed) table: {'m', 'v'} like the table, or {'acc'} [R]."""
  if kind == "lazy_adam":
    return {"m": jax.tree.map(jnp.zeros_like, table), "v": jax.tree.map(jnp.zeros_like, table)}
  if isinstance(table, nn.LogicallyPartitioned):
    return {
      "acc": table.replace(
        value=jnp.zeros(table.value.shape[:1], jnp.float32), names=table.names[:1]
      )
    }
  return {"acc": jnp.zeros(table.shape[:1], jnp.float32)}


def make_tx(
  model: nn.Module, tx: optax.GradientTransformation, opts: SparseOptions
) -> optax.GradientTransformation:
  """An optax transformation whose ``init(params)`` builds the split optimiser state
  (module docstring); for ``steps.make_init_fn``. Its ``update`` raises: the sparse steps
  apply the updates themselves."""

  def init(params):
    tables = find_tables(model, params)
    rest, tabs = split_params(params, tables)
    tstate = traverse_util.unflatten_dict(
      {t.path: table_state_init(opts.kind, tabs[t.path]) for t in tables}
    )
    return {"dense": tx.init(rest), "tables": tstate, "count": jnp.zeros((), jnp.int32)}

  def update(*_):
    raise NotImplementedError("the row-sparse optimiser is applied by sparse.make_*_step")

  return optax.GradientTransformation(init, update)


def make_init_fn(
  model: nn.Module,
  tx: optax.GradientTransformation,
  opts: SparseOptions,
  dummy: dict,
  seed: int,
  params: Any | None = None,
) -> Callable:
  """``steps.make_init_fn`` with the split optimiser state of ``make_tx``."""
  return steps.make_init_fn(model, make_tx(model, tx, opts), dummy, seed, params)


# ---- row-wise rules -------------------------------------------------------------------------
def update_rows(opts: SparseOptions, p, state: dict, g, lr, count):
  """One row-wise update of rows ``p`` [N, d] with gradient ``g`` [N, d] and state rows
  (``{'m', 'v'}`` [N, d] or ``{'acc'}`` [N]); ``count`` = updates so far. Returns (p, state)."""
  wd = opts.weight_decay
  if opts.kind == "lazy_adam":
    t = (count + 1).astype(jnp.float32)
    m = opts.b1 * state["m"] + (1 - opts.b1) * g
    v = opts.b2 * state["v"] + (1 - opts.b2) * g * g
    mhat = m / (1 - opts.b1**t)
    vhat = v / (1 - opts.b2**t)
    u = mhat / (jnp.sqrt(vhat) + opts.eps)
    if wd:
      u = u + wd * p
    return p - lr * u, {"m": m, "v": v}
  acc = state["acc"] + jnp.mean(g * g, axis=-1)
  u = g / (jnp.sqrt(acc)[:, None] + opts.adagrad_eps)
  if wd:
    u = u + wd * p
  return p - lr * u, {"acc": acc}


def dedup(t: Table, ids) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(uniq int32 [U], inv int32 like ``ids``): the distinct ids of table ``t`` in ``ids`` (any
  shape), sorted and padded with the out-of-range row ``t.rows`` to the static bound
  U = min(ids.size, R), and each id's position in ``uniq``."""
  n = _unique_bound(t, ids.shape)
  u, inv = jnp.unique(ids.reshape(-1), size=n, fill_value=t.rows, return_inverse=True)
  return u.astype(jnp.int32), inv.reshape(ids.shape).astype(jnp.int32)


def _field_ids(batch: dict, t: Table) -> list:
  """The id arrays of table ``t`` in a batch: the main batch's, then the labelled
  sub-batch's (``batch['labelled']``) when there is one."""
  out = [batch[t.side][t.field]]
  if "labelled" in batch:
    out.append(batch["labelled"][t.side][t.field])
  return out


def dedup_many(t: Table, ids_list) -> tuple[jnp.ndarray, list]:
  """``dedup`` of several id arrays together: (uniq int32 [U], [inv like each array]), U =
  min(total ids, R). One array: exactly ``dedup``."""
  if len(ids_list) == 1:
    u, inv = dedup(t, ids_list[0])
    return u, [inv]
  u, inv = dedup(t, jnp.concatenate([x.reshape(-1) for x in ids_list]))
  out, start = [], 0
  for x in ids_list:
    out.append(inv[start : start + x.size].reshape(x.shape))
    start += x.size
  return u, out


def gather_rows(full, uniq):
  """``full[uniq]`` with zeros for the padding (out-of-range) entries."""
  return jnp.take(full, uniq, axis=0, mode="fill", fill_value=0)


def apply_rows(opts: SparseOptions, table, state: dict, uniq, rows, g_rows, lr, count):
  """The row rule on the U gathered ``rows`` (``table[uniq]``) with gradient ``g_rows``
  [U, d], scattered back into the (donated) ``table`` and its ``state`` in place; padding
  entries are dropped. Returns (table, state, sum of squares of the new touched rows, number of
  touched rows)."""
  srows = {k: gather_rows(v, uniq) for k, v in state.items()}
  p_new, s_new = update_rows(opts, rows, srows, g_rows, lr, count)
  put = lambda full, r: full.at[uniq].set(
    r, mode="drop", indices_are_sorted=True, unique_indices=True
  )
  valid = uniq < table.shape[0]
  return (
    put(table, p_new),
    {k: put(state[k], s_new[k]) for k in state},
    jnp.sum(jnp.where(valid[:, None], p_new, 0.0) ** 2),
    valid.sum(),
  )


def touched_mask(t: Table, ids) -> jnp.ndarray:
  """bool [R]: the rows of table ``t`` that the ids (any shape) address."""
  return jnp.zeros((t.rows,), bool).at[ids.reshape(-1)].set(True, mode="drop")


# ---- steps ----------------------------------------------------------------------------------
def _make_step(
  model: nn.Module, tx: optax.GradientTransformation, opts: SparseOptions, loss_fn: Callable
) -> Callable:
  """A ``step(state, batch) -> (state, metrics)`` updating the tables row-sparsely.

  ``loss_fn(model, params, batch, rng, model_state) -> (loss, (extra, model_state))``.
  """

  def step(state: steps.TrainState, batch: dict):
    tables = find_tables(model, state.params)
    rest, tabs = split_params(state.params, tables)
    tflat = traverse_util.flatten_dict(
      state.opt_state["tables"], is_leaf=lambda path, x: len(path) == len(tables[0].path)
    )
    count = state.opt_state["count"]
    lr = opts.learning_rate(count)
    if opts.masked:

      def f(rest, tabs):
        return loss_fn(model, merge_params(rest, tabs), batch, state.rng, state.model_state)

      (loss, aux), (g_rest, g_tabs) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
        rest, tabs
      )
    else:
      uniq, rows, view_feats, sizes = (
        {},
        {},
        {"user": dict(batch["user"]), "item": dict(batch["item"])},
        {},
      )
      lab = batch.get("labelled")
      lab_feats = {"user": dict(lab["user"]), "item": dict(lab["item"])} if lab else None
      for t in tables:
        u, (inv, *inv_lab) = dedup_many(t, _field_ids(batch, t))
        if opts.batch_sharding is not None:
          inv = jax.lax.with_sharding_constraint(inv, opts.batch_sharding)
          inv_lab = [jax.lax.with_sharding_constraint(x, opts.batch_sharding) for x in inv_lab]
        uniq[t.path] = u
        rows[t.path] = gather_rows(tabs[t.path], u)
        view_feats[t.side][t.field] = inv
        if lab_feats is not None:
          lab_feats[t.side][t.field] = inv_lab[0]
        sizes[(t.side, t.field)] = u.shape[0]
      view = _view_model(model, sizes)
      vbatch = {**batch, "user": view_feats["user"], "item": view_feats["item"]}
      if lab_feats is not None:
        vbatch["labelled"] = {**lab, **lab_feats}

      def f(rest, rows):
        return loss_fn(view, merge_params(rest, rows), vbatch, state.rng, state.model_state)

      (loss, aux), (g_rest, g_rows) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
        rest, rows
      )
    extra, model_state = aux
    updates, dense_state = tx.update(g_rest, state.opt_state["dense"], rest)
    new_rest = optax.apply_updates(rest, updates)
    new_tabs, new_tstate, touched_sq, n_touched = {}, {}, [], []
    for t in tables:
      st = tflat[t.path]
      if opts.masked:
        mask = touched_mask(t, jnp.concatenate([x.reshape(-1) for x in _field_ids(batch, t)]))
        p_new, s_new = update_rows(opts, tabs[t.path], st, g_tabs[t.path], lr, count)
        keep = lambda new, old: jnp.where(mask.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)
        new_tabs[t.path] = keep(p_new, tabs[t.path])
        new_tstate[t.path] = {k: keep(s_new[k], st[k]) for k in st}
        touched_sq.append(jnp.sum(jnp.where(mask[:, None], new_tabs[t.path], 0.0) ** 2))
        n_touched.append(mask.sum())
        continue
      new_tabs[t.path], new_tstate[t.path], sq, n = apply_rows(
        opts, tabs[t.path], st, uniq[t.path], rows[t.path], g_rows[t.path], lr, count
      )
      touched_sq.append(sq)
      n_touched.append(n)
    params = merge_params(new_rest, new_tabs)
    g_tab_tree = g_tabs if opts.masked else g_rows
    grad_norm = jnp.sqrt(
      optax.tree.norm(g_rest) ** 2 + sum(jnp.sum(g**2) for g in g_tab_tree.values())
    )
    param_norm = jnp.sqrt(optax.tree.norm(new_rest) ** 2 + sum(touched_sq))
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
    opt_state = {
      "dense": dense_state,
      "tables": traverse_util.unflatten_dict(new_tstate),
      "count": count + 1,
    }
    metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "param_norm": param_norm,
      "touched_rows": sum(n_touched).astype(jnp.int32),
      **extra,
    }
    return state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, rng=rng, model_state=model_state
    ), metrics

  return step


def make_pretrain_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  opts: SparseOptions,
  tau: float,
  pairs: str = "scenario_views",
) -> Callable:
  """``steps.make_pretrain_step`` with row-sparse table updates. Raises ValueError for an
  unknown ``pairs``."""
  if pairs not in steps.PRETRAIN_PAIRS:
    raise ValueError(f"config.pretrain.pairs={pairs!r}; expected 'scenario_views' or 'user_item'")
  return _make_step(
    model, tx, opts, lambda m, p, b, r, ms: steps.pretrain_loss(m, p, b, r, tau, pairs, ms)
  )


def make_finetune_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  opts: SparseOptions,
  tau: float,
  logq_strength: float,
  negatives: str = "all",
  labelled_weight: float = 0.0,
) -> Callable:
  """``steps.make_finetune_step`` with row-sparse table updates (the labelled sub-batch's
  rows, when ``labelled_weight`` > 0, are touched rows too)."""
  return _make_step(
    model,
    tx,
    opts,
    lambda m, p, b, r, ms: steps.finetune_loss(
      m, p, b, r, tau, logq_strength, ms, negatives, labelled_weight
    ),
  )


def build(
  cfg,
  stage: str,
  model: nn.Module,
  tx: optax.GradientTransformation,
  dummy: dict,
  seed: int,
  num_steps: int,
  init_params=None,
  masked: bool = False,
  batch_sharding=None,
):
  """(init_fn, step_fn) of a stage for ``config.train.embedding_optimizer`` -- the dense
  ``steps`` functions for 'dense', the row-sparse ones otherwise. ``stage``: 'pretrain' or
  'finetune'. ``batch_sharding``: the batch's sharding when the step runs on a mesh
  (``SparseOptions.batch_sharding``). Raises ValueError for an unknown stage or optimiser, or a model whose tables the
  sparse path cannot address (``find_tables``)."""
  scfg = stage_config(cfg, stage)
  lw = float(cfg.train.get("labelled_weight", 0.0) or 0.0)  # 0: off (the batch has no 'labelled')
  opts = options_from_config(
    cfg.train, scfg, num_steps, masked=masked, batch_sharding=batch_sharding
  )
  if opts is None:
    init_fn = steps.make_init_fn(model, tx, dummy, seed, init_params)
    if stage == "pretrain":
      return init_fn, steps.make_pretrain_step(model, tx, scfg.tau, scfg.pairs)
    return init_fn, steps.make_finetune_step(
      model, tx, cfg.model.tau, scfg.logq_strength, scfg.negatives, lw
    )
  init_fn = make_init_fn(model, tx, opts, dummy, seed, init_params)
  if stage == "pretrain":
    return init_fn, make_pretrain_step(model, tx, opts, scfg.tau, scfg.pairs)
  return init_fn, make_finetune_step(
    model, tx, opts, cfg.model.tau, scfg.logq_strength, scfg.negatives, lw
  )
