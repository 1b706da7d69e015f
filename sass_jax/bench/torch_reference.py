"""A straightforward PyTorch reference of the SASS towers and losses (docs/design.md §1-2).

Same model as ``sass_jax.model.towers.SASS`` with the defaults it supports (``gate_style=
'gated_sum'``, shared gates, ``bias_mode='add'``, any activation of ``sass_jax.model.mlsat``,
dropout and layer norm off), the same two losses as ``sass_jax.train.losses`` / ``steps`` and the
same optimiser (AdamW, linear warm-up then cosine decay to 10%, eps 1e-8, the stage's weight
decay; dense updates of every parameter, embedding tables included). Written the way one
would write it in eager PyTorch: ``nn.Parameter`` tensors, ``torch.einsum``, ``loss.backward()``,
``optimizer.step()``. Parameters keep the Flax layout (Dense kernels ``[in, out]``, per-scenario
kernels ``[K, in, out]``, tables ``[rows, d]``), so ``load_flax_params`` copies a JAX model's
parameters in and the two losses can be checked to agree (``tests/test_bench.py``).

Arithmetic (``compute``, as ``config.model.scenario_compute``): 'grouped' (default) does only
what the model needs, the way one would in eager PyTorch: a per-scenario layer sorts the rows by
scenario and multiplies each scenario's contiguous block by its own kernel (``grouped_linear``:
``torch.split`` by the scenario counts, one matmul per scenario present, no padding); the
shared gates are applied in blocks (``W_g g`` once per sample, ``W_z z`` once per scenario);
the in-batch logits of ``negatives='all'`` multiply each row only by the items' vectors in its
own scenario (one ``[n_k, D] x [D, B]`` matmul per scenario); scenario-view pre-training encodes
only the two views. 'onehot' is the earlier formulation (every row times all K kernels, a
one-hot keeps one; logits through a one-hot einsum; all K views encoded). ``negatives=
'same_scenario'`` encodes each item once in its row's scenario and masks other scenarios.

Torch is an optional extra (``pip install .[bench]``); only ``sass_jax.bench.vs_pytorch`` (its
torch child) and the tests import this module, so ``sass_jax`` imports without torch.

Usage (``sass_jax.bench.vs_pytorch`` drives it)::

  model = TorchSASS.from_model_config(mc)              # mc: sass_jax.model.towers.ModelConfig
  step = make_step(model, "finetune", tau=0.2, lr=1e-3, num_steps=1000, warmup=100)
  loss = step(batch)                                   # batch: NumPy dict of BatchFn
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from sass_jax.model.embedding import padded_rows  # the JAX tables' row counts

ACTIVATIONS: dict[str, Callable] = {
  "relu": torch.relu,
  "gelu": lambda x: nn.functional.gelu(x, approximate="tanh"),
  "silu": nn.functional.silu,
  "tanh": torch.tanh,
  "leaky_relu": lambda x: nn.functional.leaky_relu(x, 0.01),
}
_MASKED = -1e9


def _normal(shape, std):
  return nn.Parameter(torch.randn(*shape) * std)


def _lecun(fan_in, shape):
  return nn.Parameter(torch.randn(*shape) / math.sqrt(fan_in))


class Dense(nn.Module):
  """``x @ kernel + bias``; kernel ``[in, out]`` (Flax layout)."""

  def __init__(self, d_in: int, d_out: int):
    super().__init__()
    self.kernel = _lecun(d_in, (d_in, d_out))
    self.bias = nn.Parameter(torch.zeros(d_out))

  def forward(self, x):
    return x @ self.kernel + self.bias


class Groups:
  """Rows sorted by scenario: ``order`` (sorted position -> row), ``inverse`` (row -> sorted
  position), ``counts`` (rows per scenario, Python ints), ``scenario`` (int64 ``[N]``)."""

  def __init__(self, scenario: torch.Tensor, k: int):
    self.scenario = scenario.reshape(-1)
    self.order = torch.argsort(self.scenario, stable=True)
    self.inverse = torch.argsort(self.order)
    self.counts = torch.bincount(self.scenario, minlength=k).tolist()


def grouped_linear(x: torch.Tensor, kernel: torch.Tensor, groups: Groups) -> torch.Tensor:
  """Row n of ``x [N, in]`` times ``kernel[scenario[n]]`` (``[K, in, out]``) -> ``[N, out]``:
  one matmul per scenario over its rows (sorted by scenario), then back to row order."""
  parts = torch.split(x.index_select(0, groups.order), groups.counts)
  y = torch.cat([p @ kernel[k] for k, p in enumerate(parts) if p.shape[0]], 0)
  return y.index_select(0, groups.inverse)


class ScenarioDense(nn.Module):
  """One kernel per scenario, stacked ``[K, in, out]``; selected layout ``(x [B, in], onehot
  [B, K]) -> [B, out]`` or ``(x [..., in], Groups) -> [..., out]``, all-scenarios layout
  ``(x [B, K, in], None) -> [B, K, out]``."""

  def __init__(self, d_in: int, d_out: int, k: int):
    super().__init__()
    self.kernel = _lecun(d_in, (k, d_in, d_out))
    self.bias = nn.Parameter(torch.zeros(k, d_out))

  def forward(self, x, onehot):
    if onehot is None:
      return torch.einsum("bki,kio->bko", x, self.kernel) + self.bias
    if isinstance(onehot, Groups):
      y = grouped_linear(x.reshape(-1, x.shape[-1]), self.kernel, onehot)
      y = y + self.bias.index_select(0, onehot.scenario)
      return y.reshape(*x.shape[:-1], y.shape[-1])
    return (
      torch.einsum("bk,bki->bi", onehot, torch.einsum("bi,kio->bko", x, self.kernel))
      + onehot @ self.bias
    )


class MLSATLayer(nn.Module):
  """One ML-SAT layer, 'gated_sum' (docs/design.md §1); returns ``(g_l, h_l)``."""

  def __init__(self, d_in: int, width: int, k: int, d_s: int, act: str):
    super().__init__()
    self.act = ACTIVATIONS[act]
    self.glob = Dense(d_in, width)
    self.scenario = ScenarioDense(d_in, width, k)
    self.adaptive_gate = Dense(2 * width + d_s, width)
    self.update_gate = Dense(2 * width + d_s, width)

  def forward(self, g, h, z, onehot):
    g = self.act(self.glob(g))
    s = self.act(self.scenario(h, onehot))
    if isinstance(onehot, Groups) or (onehot is None and z.dim() == 2):
      return g, self._blocks(g, s, z, onehot)
    gb = g.expand(s.shape)
    zb = z.expand(*s.shape[:-1], z.shape[-1])
    a = torch.sigmoid(self.adaptive_gate(torch.cat([gb, s, zb], -1)))
    c = a * gb
    u = torch.sigmoid(self.update_gate(torch.cat([c, s, zb], -1)))
    return g, u * s + (1.0 - u) * c

  def _blocks(self, g, s, z, groups):
    """The gates block by block (grouped compute): z is the ``[K, d_s]`` table."""
    w = g.shape[-1]
    if isinstance(groups, Groups):
      rows = lambda t: t.index_select(0, groups.scenario).reshape(*s.shape[:-1], t.shape[-1])
    else:
      rows = lambda t: t[None]

    def gate(dense, first):
      k = dense.kernel
      return torch.sigmoid(first @ k[:w] + s @ k[w : 2 * w] + rows(z @ k[2 * w :]) + dense.bias)

    a = gate(self.adaptive_gate, g)
    c = a * g
    u = gate(self.update_gate, c)
    return u * s + (1.0 - u) * c


class Tower(nn.Module):
  """Field embeddings -> ML-SAT layers -> ``out + bias_net(z)`` -> L2 normalise."""

  def __init__(
    self,
    specs: Sequence,
    rows: Sequence[int],
    embed_dim: int,
    k: int,
    d_s: int,
    widths: Sequence[int],
    out_dim: int,
    bias_hidden: int,
    act: str,
  ):
    super().__init__()
    self.specs = list(specs)
    self.embed = nn.ParameterDict(
      {s.name: _normal((r, embed_dim), 0.1) for s, r in zip(self.specs, rows)}
    )
    self.k, self.act = k, ACTIVATIONS[act]
    d = embed_dim * len(self.specs)
    layers = []
    for w in widths:
      layers.append(MLSATLayer(d, w, k, d_s, act))
      d = w
    self.layers = nn.ModuleList(layers)
    self.out = Dense(d, out_dim)
    self.bias_hidden = Dense(d_s, bias_hidden)
    self.bias_out = Dense(bias_hidden, out_dim)

  def embed_fields(self, feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    outs = []
    for s in self.specs:
      e = self.embed[s.name][feats[s.name]]
      if s.multi_hot:
        m = feats[f"{s.name}_mask"].to(e.dtype)[..., None]
        e = (e * m).sum(-2) / m.sum(-2).clamp_min(1.0)
      outs.append(e)
    return torch.cat(outs, -1)

  def forward(self, feats, z, onehot):
    """'onehot' compute: z ``[B, d_s]`` / ``[1, K, d_s]``, onehot ``[B, K]`` / None. 'grouped':
    z the table ``[K, d_s]``, onehot a ``Groups`` of B * V rows (-> ``[B, V, D]``) or None."""
    e = self.embed_fields(feats)
    B = e.shape[0]
    grouped = isinstance(onehot, Groups)
    if grouped:
      v = onehot.scenario.shape[0] // B
      g, h = e[:, None, :], e[:, None, :].expand(B, v, e.shape[-1])
    elif onehot is None:
      g, h = e[:, None, :], e[:, None, :].expand(B, self.k, e.shape[-1])
    else:
      g = h = e
    for layer in self.layers:
      g, h = layer(g, h, z, onehot)
    out = self.out(h)
    if grouped or (onehot is None and z.dim() == 2):  # bias net once per scenario
      bias = self.bias_out(self.act(self.bias_hidden(z)))  # [K, D]
      bias = (
        bias.index_select(0, onehot.scenario).reshape(B, -1, bias.shape[-1])
        if grouped
        else bias[None]
      )
      r = out + bias
    else:
      zb = z.expand(*out.shape[:-1], z.shape[-1])
      r = out + self.bias_out(self.act(self.bias_hidden(zb)))
    return r * torch.rsqrt((r * r).sum(-1, keepdim=True).clamp_min(1e-12))


class TorchSASS(nn.Module):
  """The two-tower SASS model; ``encode_user`` / ``encode_item`` as in ``sass_jax``: scenario
  int64 ``[B]`` -> ``[B, D]``, None -> ``[B, K, D]``."""

  def __init__(
    self,
    user_specs,
    item_specs,
    user_rows,
    item_rows,
    num_scenarios: int,
    embed_dim=16,
    scenario_dim=16,
    widths=(256, 128),
    out_dim=64,
    bias_hidden=32,
    activation="relu",
    compute="grouped",
    compute_dtype="float32",
  ):
    super().__init__()
    if compute not in ("grouped", "onehot"):
      raise ValueError(f"compute={compute!r}; expected 'grouped' or 'onehot'")
    if compute_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"compute_dtype={compute_dtype!r}; expected 'float32' or 'bfloat16'")
    self.k, self.compute, self.compute_dtype = num_scenarios, compute, compute_dtype
    self.scenario_embedding = _normal((num_scenarios, scenario_dim), 0.1)
    args = (embed_dim, num_scenarios, scenario_dim, widths, out_dim, bias_hidden, activation)
    self.user_tower = Tower(user_specs, user_rows, *args)
    self.item_tower = Tower(item_specs, item_rows, *args)

  @classmethod
  def from_model_config(cls, mc) -> "TorchSASS":
    """Build from a ``sass_jax.model.towers.ModelConfig``; raises ValueError for an option this
    reference does not implement."""
    unsupported = {
      "gate_style": (mc.gate_style, "gated_sum"),
      "bias_mode": (mc.bias_mode, "add"),
      "item_scenario": (mc.item_scenario, "specific"),
      "user_scenario": (mc.user_scenario, "specific"),
      "gate_per_scenario": (mc.gate_per_scenario, False),
      "layer_norm": (mc.layer_norm, False),
      "dropout": (mc.dropout, 0.0),
    }
    bad = {k: v for k, (v, want) in unsupported.items() if v != want}
    if bad:
      raise ValueError(f"torch_reference implements the default SASS only; config.model has {bad}")
    pad = lambda v: padded_rows(int(v), mc.vocab_pad_to)
    return cls(
      mc.user_specs,
      mc.item_specs,
      [pad(s.vocab_size) for s in mc.user_specs],
      [pad(s.vocab_size) for s in mc.item_specs],
      mc.num_scenarios,
      mc.embed_dim,
      mc.scenario_dim,
      tuple(mc.widths),
      mc.out_dim,
      mc.bias_hidden,
      mc.activation,
      getattr(mc, "scenario_compute", "grouped"),
      getattr(mc, "compute_dtype", "float32"),
    )

  def _encode(self, tower, feats, scenario):
    """The tower's vectors, float32. With ``compute_dtype='bfloat16'`` the tower runs under
    ``torch.autocast`` (PyTorch's mixed precision: bfloat16 matmuls with float32 parameters),
    as ``sass_jax`` runs its towers in bfloat16; the losses stay float32 on both sides."""
    device = self.scenario_embedding.device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=self.compute_dtype == "bfloat16"):
      return self._encode_in_dtype(tower, feats, scenario).float()

  def _encode_in_dtype(self, tower, feats, scenario):
    if self.compute == "grouped":
      if scenario is None:
        return tower(feats, self.scenario_embedding, None)
      r = tower(feats, self.scenario_embedding, Groups(scenario, self.k))  # [B, V, D]
      return r[:, 0] if scenario.dim() == 1 else r
    if scenario is None:
      return tower(feats, self.scenario_embedding[None], None)
    onehot = nn.functional.one_hot(scenario, self.k).to(self.scenario_embedding.dtype)
    return tower(feats, onehot @ self.scenario_embedding, onehot)

  def encode_user(self, feats, scenario=None):
    """scenario int64 ``[B]`` -> ``[B, D]``; ``[B, V]`` ('grouped') -> ``[B, V, D]``; None ->
    ``[B, K, D]``."""
    return self._encode(self.user_tower, feats, scenario)

  def encode_item(self, feats, scenario=None):
    return self._encode(self.item_tower, feats, scenario)

  @torch.no_grad()
  def load_flax_params(self, params: Mapping):
    """Copy a ``sass_jax`` SASS model's (unboxed) params into this module."""
    self.scenario_embedding.copy_(_t(params["scenario_embedding"]))
    for side, tower in (("user_tower", self.user_tower), ("item_tower", self.item_tower)):
      p = params[side]
      for name, t in tower.embed.items():
        t.copy_(_t(p["embed"][name]))
      for l, layer in enumerate(tower.layers):
        q = p[f"mlsat_{l}"]
        for mine, theirs in (
          (layer.glob, "global"),
          (layer.scenario, "scenario"),
          (layer.adaptive_gate, "adaptive_gate"),
          (layer.update_gate, "update_gate"),
        ):
          mine.kernel.copy_(_t(q[theirs]["kernel"]))
          mine.bias.copy_(_t(q[theirs]["bias"]))
      for name in ("out", "bias_hidden", "bias_out"):
        getattr(tower, name).kernel.copy_(_t(p[name]["kernel"]))
        getattr(tower, name).bias.copy_(_t(p[name]["bias"]))


def _t(x) -> torch.Tensor:
  """A float32 torch copy of an array (JAX arrays are read-only)."""
  return torch.from_numpy(np.array(x, np.float32))


# ---- losses (sass_jax/train/losses.py) -------------------------------------------------------
def _dup_mask(ids):
  same = ids[:, None] == ids[None, :]
  return same & ~torch.eye(ids.shape[0], dtype=torch.bool, device=ids.device)


def _ce_diag(logits):
  return torch.logsumexp(logits, -1) - torch.diagonal(logits)


def info_nce(a, b, ids, tau: float):
  """Symmetric in-batch InfoNCE (``losses.info_nce``)."""
  logits = (a @ b.T / tau).masked_fill(_dup_mask(ids), _MASKED)
  return 0.5 * (_ce_diag(logits).mean() + _ce_diag(logits.T).mean())


def sampled_softmax_logq(logits, item_ids, logq, tau: float, alpha: float, scenario=None):
  """In-batch sampled softmax with logQ correction (``losses.sampled_softmax_logq``); with
  ``scenario`` columns of another scenario than the row's are masked too."""
  mask = _dup_mask(item_ids)
  if scenario is not None:
    mask = mask | (scenario[:, None] != scenario[None, :])
  z = (logits / tau - alpha * logq[None, :]).masked_fill(mask, _MASKED)
  return _ce_diag(z).mean()


def finetune_loss(
  model: TorchSASS, b: Mapping, tau: float, logq_strength: float, negatives: str = "all"
):
  """Stage-2 loss on a torch batch (``steps.finetune_loss``)."""
  if negatives not in ("all", "same_scenario"):
    raise ValueError(f"negatives={negatives!r}; expected 'all' or 'same_scenario'")
  u = model.encode_user(b["user"], b["scenario"])  # [B, D]
  if negatives == "same_scenario":
    i = model.encode_item(b["item"], b["scenario"])  # [B, D]
    return sampled_softmax_logq(
      u @ i.T, b["item_index"], b["item_logq"], tau, logq_strength, b["scenario"]
    )
  i_all = model.encode_item(b["item"], None)  # [B, K, D]
  if model.compute == "grouped":  # row b times the items in its own scenario only
    groups = Groups(b["scenario"], model.k)
    logits = grouped_linear(u, i_all.permute(1, 2, 0), groups)  # [B, B]
  else:
    onehot = nn.functional.one_hot(b["scenario"], model.k).to(u.dtype)
    logits = torch.einsum("bkd,jkd->bj", u[:, None, :] * onehot[:, :, None], i_all)
  return sampled_softmax_logq(logits, b["item_index"], b["item_logq"], tau, logq_strength)


def pretrain_loss(model: TorchSASS, b: Mapping, tau: float, pairs: str):
  """Stage-1 loss on a torch batch (``steps.pretrain_loss``)."""
  if pairs == "user_item":
    u = model.encode_user(b["user"], b["scenario"])
    i = model.encode_item(b["item"], b["scenario"])
    # a column sharing the row's user or its item is masked (as in ``steps.pretrain_loss``)
    logits = (u @ i.T / tau).masked_fill(
      _dup_mask(b["user_index"]) | _dup_mask(b["item_index"]), _MASKED
    )
    return 0.5 * (_ce_diag(logits).mean() + _ce_diag(logits.T).mean())
  if pairs != "scenario_views":
    raise ValueError(f"pairs={pairs!r}; expected 'scenario_views' or 'user_item'")
  if model.compute == "grouped":  # only the two views
    uv, iv = (
      model.encode_user(b["user"], b["user_views"]),
      model.encode_item(b["item"], b["item_views"]),
    )
  else:
    u_all, i_all = model.encode_user(b["user"], None), model.encode_item(b["item"], None)
    take = lambda v, idx: torch.gather(v, 1, idx[:, :, None].expand(-1, -1, v.shape[-1]))
    uv, iv = take(u_all, b["user_views"]), take(i_all, b["item_views"])
  return info_nce(uv[:, 0], uv[:, 1], b["user_index"], tau) + info_nce(
    iv[:, 0], iv[:, 1], b["item_index"], tau
  )


def to_torch(batch: Mapping, device: str | torch.device = "cpu") -> dict:
  """A NumPy batch of ``sass_jax.data.pipeline.BatchFn`` as torch tensors (ids int64) on
  ``device``."""

  def conv(x):
    x = np.asarray(x)
    return torch.from_numpy(x.astype(np.int64 if x.dtype.kind in "iu" else x.dtype, copy=True)).to(
      device
    )

  return {
    k: ({f: conv(v) for f, v in x.items()} if isinstance(x, Mapping) else conv(x))
    for k, x in batch.items()
  }


def make_optimizer(
  model: nn.Module, lr: float, num_steps: int, warmup: int, weight_decay: float = 0.0
):
  """AdamW with the schedule of ``sass_jax.train.steps.make_optimizer`` (linear warm-up from 0,
  cosine decay to 10% at ``num_steps``). Returns (optimizer, LambdaLR scheduler)."""
  warmup = min(int(warmup), max(num_steps - 1, 0))
  decay = max(num_steps, warmup + 1) - warmup

  def factor(step):
    if warmup and step < warmup:
      return step / warmup
    t = min(max(step - warmup, 0), decay) / decay
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

  opt = torch.optim.AdamW(
    model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay
  )
  return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def make_step(
  model: TorchSASS,
  stage: str,
  tau: float,
  lr: float,
  num_steps: int,
  warmup: int,
  weight_decay: float = 0.0,
  logq_strength: float = 1.0,
  pairs: str = "scenario_views",
  negatives: str = "all",
  compile: bool = False,
) -> Callable[[dict], float]:
  """A training step ``step(torch_batch) -> loss tensor`` (zero_grad, forward, backward, AdamW
  step, schedule step). ``stage`` is 'finetune' or 'pretrain'; raises ValueError otherwise.
  ``compile``: the loss function (forward, and through AOTAutograd its backward) runs under
  ``torch.compile(dynamic=True)`` (graph breaks allowed: the grouped layers' per-scenario row
  counts are data); the optimiser step stays eager."""
  if stage not in ("finetune", "pretrain"):
    raise ValueError(f"stage={stage!r}; expected 'finetune' or 'pretrain'")
  opt, sched = make_optimizer(model, lr, num_steps, warmup, weight_decay)
  if stage == "finetune":
    loss_fn = lambda b: finetune_loss(model, b, tau, logq_strength, negatives)
  else:
    loss_fn = lambda b: pretrain_loss(model, b, tau, pairs)
  if compile:
    loss_fn = torch.compile(loss_fn, dynamic=True)

  def step(b):
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(b)
    loss.backward()
    opt.step()
    sched.step()
    return loss.detach()

  return step
