"""Device mesh, sharding rules and placement of inputs, state and steps (docs/design.md §6).

This is the only module that builds ``NamedSharding``s. Model code names logical axes
('vocab', 'embed', 'scenario', 'mlp_in', 'mlp_out'); ``RULES`` maps them onto the mesh axes
('data', 'model'):

- embedding tables ``[rows, d]`` ('vocab', 'embed') and their optimiser state (moments ``[rows,
  d]``, row accumulators ``[rows]``): tables with fewer than ``shard_min_rows`` rows are
  replicated; the others are row-split by ``config.mesh.table_layout`` (``TABLE_LAYOUTS``):
  'all' over every device (('data', 'model') jointly: each device holds rows / (data * model)),
  'model' over the 'model' axis only (a copy per 'data' coordinate), 'auto' (the default) 'all'
  when the rows divide over every device, else 'model'. A table that cannot be split evenly
  raises ValueError naming it and the fix: a large table is never replicated silently (rows are
  padded for this, ``sass_jax.model.embedding.padded_rows``);
- dense and per-scenario weights: replicated;
- every batch array: leading (batch) dimension split over 'data'.

``jax.jit(..., in_shardings=, out_shardings=, donate_argnums=)`` is what ``pjit`` became.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from sass_jax.model import grouped

AXES = ("data", "model")
TABLE_LAYOUTS = ("auto", "all", "model")
RULES = (
  ("vocab", "model"),
  ("embed", None),
  ("scenario", None),
  ("mlp_in", None),
  ("mlp_out", None),
  ("batch", "data"),
)


def mesh_shape(data: int, model: int, num_devices: int) -> tuple[int, int]:
  """Resolve (data, model) sizes where one of them may be -1 ('the rest of the devices').

  Raises ValueError if the sizes do not multiply to ``num_devices``.
  """
  if data == -1 and model == -1:
    raise ValueError("config.mesh.data and config.mesh.model cannot both be -1")
  if data == -1:
    if num_devices % model:
      raise ValueError(f"config.mesh.model={model} does not divide the {num_devices} devices")
    data = num_devices // model
  if model == -1:
    if num_devices % data:
      raise ValueError(f"config.mesh.data={data} does not divide the {num_devices} devices")
    model = num_devices // data
  if data * model != num_devices:
    raise ValueError(
      f"mesh data={data} x model={model} = {data * model} devices, but "
      f"{num_devices} are available; set config.mesh.data / model (-1 = the rest)"
    )
  return data, model


class Partitioner:
  """Owns the ('data', 'model') mesh and every sharding decision.

  Args:
    mesh_cfg: ``config.mesh`` (data, model, shard_min_rows, table_layout: one of
      ``TABLE_LAYOUTS``).
    devices: devices to use (default ``jax.devices()``, all processes); also the devices of a
      TPU topology description (``sass_jax.aot``: compiled, never run).

  Raises ValueError for mesh sizes that do not fit the devices or an unknown table layout.
  """

  def __init__(self, mesh_cfg, devices: Sequence[jax.Device] | None = None):
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(int(mesh_cfg.data), int(mesh_cfg.model), len(devices))
    self.mesh: Mesh = jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)
    self.shard_min_rows = int(mesh_cfg.shard_min_rows)
    self.table_layout = str(mesh_cfg.table_layout)
    if self.table_layout not in TABLE_LAYOUTS:
      raise ValueError(
        f"config.mesh.table_layout={self.table_layout!r}; expected one of {TABLE_LAYOUTS}"
      )

  @property
  def data_size(self) -> int:
    return self.mesh.shape["data"]

  @property
  def model_size(self) -> int:
    return self.mesh.shape["model"]

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def batch_sharding(self) -> NamedSharding:
    """Leading dimension over 'data', every other dimension whole."""
    return NamedSharding(self.mesh, P("data"))

  def check_batch_size(self, batch_size: int, what: str):
    """Raise ValueError unless ``batch_size`` splits evenly over the data axis (and hence over
    the processes' slices, see ``data_shard``)."""
    n = self.data_size
    if batch_size % n:
      raise ValueError(f"{what}={batch_size} must be divisible by the mesh's data axis ({n})")

  def data_shard(self) -> tuple[int, int]:
    """(index, count): this process feeds rows ``[index*B/count, (index+1)*B/count)`` of every
    global batch of B rows (the ``process_index, process_count`` of ``pipeline.make_iterator``).

    The slice is the span of 'data' coordinates of the mesh devices this process owns: with
    one process it is (0, 1); with P processes each holding a whole block of the data axis it
    is (p, P); processes that share the data coordinates (the data axis does not span
    processes, e.g. data=1) feed identical rows. Raises ValueError if this process owns no
    device of the mesh, or its devices do not cover an aligned contiguous block of the data
    axis of the same size as every other process's.
    """
    if getattr(self, "_data_shard", None) is not None:
      return self._data_shard
    axis = self.mesh.axis_names.index("data")
    coords: dict[int, set[int]] = {}
    for idx, d in np.ndenumerate(self.mesh.devices):
      coords.setdefault(d.process_index, set()).add(idx[axis])
    mine = sorted(coords.get(jax.process_index(), ()))
    if not mine:
      raise ValueError(
        f"process {jax.process_index()} owns no device of the mesh {dict(self.mesh.shape)}"
      )
    n = len(mine)
    for p, c in coords.items():
      c = sorted(c)
      if len(c) != n or c != list(range(c[0], c[0] + n)) or c[0] % n:
        raise ValueError(
          f"mesh {dict(self.mesh.shape)}: process {p} holds data coordinates "
          f"{c}, process {jax.process_index()} holds {mine}; every process must "
          "hold an aligned contiguous block of the same size (change "
          "config.mesh.data / config.mesh.model)"
        )
    self._data_shard = (mine[0] // n, self.data_size // n)
    return self._data_shard

  def shard_batch(self, local_batch: Any) -> Any:
    """Place this process's slice of a batch (a pytree of NumPy arrays, leading dim = local
    batch, the rows given by ``data_shard``) onto the mesh as global arrays split over 'data'
    (``jax.make_array_from_process_local_data``); leading dim of the result = local * count."""
    sh = self.batch_sharding()
    count = self.data_shard()[1]

    def one(x):
      x = np.asarray(x)
      return jax.make_array_from_process_local_data(sh, x, (x.shape[0] * count,) + x.shape[1:])

    return jax.tree.map(one, local_batch)

  # -- state -----------------------------------------------------------------------------
  def table_axes(self, rows: int, name: str = "an embedding table") -> tuple[str, ...]:
    """Mesh axes the rows of a ``rows``-row table (or its optimiser state) are split over:
    () (replicated) below ``shard_min_rows``, else per ``table_layout`` (module docstring).

    Raises ValueError, naming ``name``, when the rows do not split evenly over the layout's
    devices (the message gives the padding or layout that fixes it).
    """
    if rows < self.shard_min_rows or self.mesh.size == 1:
      return ()
    n_all, n_model = self.mesh.size, self.model_size
    if self.data_size > 1 and (
      self.table_layout == "all" or (self.table_layout == "auto" and rows % n_all == 0)
    ):
      axes, n = ("data", "model"), n_all
    else:
      axes, n = ("model",), n_model
    if rows % n:
      raise ValueError(
        f"{name} has {rows} rows, which do not split evenly over the {n} devices of "
        f"config.mesh.table_layout={self.table_layout!r} (mesh {dict(self.mesh.shape)}), and "
        f"a table of >= config.mesh.shard_min_rows={self.shard_min_rows} rows is never "
        f"replicated; set config.model.vocab_pad_to to a multiple of {n} (rows are padded to "
        "it), or config.mesh.shard_min_rows above the table's rows to replicate it"
      )
    return axes

  def table_shards(self, rows: int) -> int:
    """Number of devices a ``rows``-row table's rows are split over (1: replicated)."""
    return int(np.prod([self.mesh.shape[a] for a in self.table_axes(rows)], dtype=np.int64))

  def state_shardings(self, abstract_boxed_state: Any) -> Any:
    """NamedShardings for the *unboxed* state, from a state whose params carry logical axes.

    ``abstract_boxed_state`` is ``jax.eval_shape`` of an init function that returns params
    still boxed in ``nn.LogicallyPartitioned`` (optax states built from boxed params carry the
    same boxes). Every leaf whose first logical axis is 'vocab' (tables, their moments and
    row accumulators) is placed by ``table_axes``; raises ValueError as it does.
    """
    specs = nn.get_partition_spec(abstract_boxed_state)
    shapes = nn.meta.unbox(abstract_boxed_state)

    def to_sharding(path, spec, leaf):
      mesh_spec = nn.logical_to_mesh_axes(spec, RULES) if spec is not None else P()
      mesh_spec = P(*mesh_spec) if mesh_spec is not None else P()
      if len(mesh_spec) and mesh_spec[0] == "model":
        name = "the table " + "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        axes = self.table_axes(leaf.shape[0], name)
        first = None if not axes else axes[0] if len(axes) == 1 else axes
        mesh_spec = P(first, *mesh_spec[1:])
      return NamedSharding(self.mesh, mesh_spec)

    return jax.tree_util.tree_map_with_path(
      to_sharding, specs, shapes, is_leaf=lambda x: isinstance(x, P) or x is None
    )

  def init(self, init_fn: Callable[[], Any]) -> tuple[Any, Any]:
    """Run ``init_fn`` (no args; returns a state with boxed params) directly into its shardings.

    Returns (state with plain arrays, state shardings).
    """
    abstract = jax.eval_shape(init_fn)
    shardings = self.state_shardings(abstract)
    state = jax.jit(lambda: nn.meta.unbox(init_fn()), out_shardings=shardings)()
    return state, shardings

  def abstract_state(self, init_fn: Callable[[], Any]) -> tuple[Any, Any]:
    """(ShapeDtypeStructs with shardings on this mesh, shardings) for restoring a checkpoint."""
    abstract = jax.eval_shape(init_fn)
    shardings = self.state_shardings(abstract)
    shapes = nn.meta.unbox(abstract)
    return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    ), shardings

  def compile_step(self, step_fn: Callable, state_shardings: Any) -> Callable:
    """``jax.jit`` a ``step(state, batch) -> (state, metrics)`` with the state donated, the
    state kept in ``state_shardings``, the batch split over 'data' and metrics replicated.

    The step is traced inside ``grouped.batch_blocks(data size)``: per-scenario layers group
    the rows by scenario within each device's share of the batch (sass_jax/model/grouped.py),
    so no device computes another's rows."""
    blocks, block_sharding = self.data_size, NamedSharding(self.mesh, P("data"))

    def traced(state, batch):
      with grouped.batch_blocks(blocks, block_sharding):
        return step_fn(state, batch)

    return jax.jit(
      traced,
      in_shardings=(state_shardings, self.batch_sharding()),
      out_shardings=(state_shardings, self.replicated()),
      donate_argnums=(0,),
    )
