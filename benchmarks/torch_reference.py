"""A straightforward PyTorch reference of the SASS towers and losses (issue 6, SPEC sections 1-2).

Same model as ``sass_jax.model.towers.SASS`` with the defaults it supports (``gate_style=
'gated_sum'``, shared gates, ``bias_mode='add'``, any activation of ``sass_jax.model.mlsat``,
dropout and layer norm off), the same two losses as ``sass_jax.train.losses`` / ``steps`` and the
same optimiser (AdamW, linear warm-up then cosine decay to 10%, eps 1e-8, the stage's weight
decay; dense updates of every parameter, embedding tables included). Written the way one
would write it in eager PyTorch: ``nn.Parameter`` tensors, ``torch.einsum``, ``loss.backward()``,
``optimizer.step()``. Parameters keep the Flax layout (Dense kernels ``[in, out]``, per-scenario
kernels ``[K, in, out]``, tables ``[rows, d]``), so ``load_flax_params`` copies a JAX model's
parameters in and the two losses can be checked to agree (``tests/test_bench.py``).

Torch is an optional extra (``pip install .[bench]``); nothing in ``sass_jax`` imports this file.

Usage (``benchmarks/compare.py`` drives it)::

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

ACTIVATIONS: dict[str, Callable] = {
    "relu": torch.relu, "gelu": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "silu": nn.functional.silu, "tanh": torch.tanh,
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


class ScenarioDense(nn.Module):
  """One kernel per scenario, stacked ``[K, in, out]``; selected layout ``(x [B, in], onehot
  [B, K]) -> [B, out]``, all-scenarios layout ``(x [B, K, in], None) -> [B, K, out]``."""

  def __init__(self, d_in: int, d_out: int, k: int):
    super().__init__()
    self.kernel = _lecun(d_in, (k, d_in, d_out))
    self.bias = nn.Parameter(torch.zeros(k, d_out))

  def forward(self, x, onehot):
    if onehot is None:
      return torch.einsum("bki,kio->bko", x, self.kernel) + self.bias
    return (torch.einsum("bk,bki->bi", onehot, torch.einsum("bi,kio->bko", x, self.kernel))
            + onehot @ self.bias)


class MLSATLayer(nn.Module):
  """One ML-SAT layer, 'gated_sum' (SPEC section 1); returns ``(g_l, h_l)``."""

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
    gb = g.expand(s.shape)
    zb = z.expand(*s.shape[:-1], z.shape[-1])
    a = torch.sigmoid(self.adaptive_gate(torch.cat([gb, s, zb], -1)))
    c = a * gb
    u = torch.sigmoid(self.update_gate(torch.cat([c, s, zb], -1)))
    return g, u * s + (1.0 - u) * c


class Tower(nn.Module):
  """Field embeddings -> ML-SAT layers -> ``out + bias_net(z)`` -> L2 normalise."""

  def __init__(self, specs: Sequence, rows: Sequence[int], embed_dim: int, k: int, d_s: int,
               widths: Sequence[int], out_dim: int, bias_hidden: int, act: str):
    super().__init__()
    self.specs = list(specs)
    self.embed = nn.ParameterDict({s.name: _normal((r, embed_dim), 0.1)
                                   for s, r in zip(self.specs, rows)})
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
    e = self.embed_fields(feats)
    if onehot is None:
      g, h = e[:, None, :], e[:, None, :].expand(e.shape[0], self.k, e.shape[-1])
    else:
      g = h = e
    for layer in self.layers:
      g, h = layer(g, h, z, onehot)
    out = self.out(h)
    zb = z.expand(*out.shape[:-1], z.shape[-1])
    r = out + self.bias_out(self.act(self.bias_hidden(zb)))
    return r * torch.rsqrt((r * r).sum(-1, keepdim=True).clamp_min(1e-12))


class TorchSASS(nn.Module):
  """The two-tower SASS model; ``encode_user`` / ``encode_item`` as in ``sass_jax``: scenario
  int64 ``[B]`` -> ``[B, D]``, None -> ``[B, K, D]``."""

  def __init__(self, user_specs, item_specs, user_rows, item_rows, num_scenarios: int,
               embed_dim=16, scenario_dim=16, widths=(256, 128), out_dim=64, bias_hidden=32,
               activation="relu"):
    super().__init__()
    self.k = num_scenarios
    self.scenario_embedding = _normal((num_scenarios, scenario_dim), 0.1)
    args = (embed_dim, num_scenarios, scenario_dim, widths, out_dim, bias_hidden, activation)
    self.user_tower = Tower(user_specs, user_rows, *args)
    self.item_tower = Tower(item_specs, item_rows, *args)

  @classmethod
  def from_model_config(cls, mc) -> "TorchSASS":
    """Build from a ``sass_jax.model.towers.ModelConfig``; raises ValueError for an option this
    reference does not implement."""
    unsupported = {"gate_style": (mc.gate_style, "gated_sum"), "bias_mode": (mc.bias_mode, "add"),
                   "gate_per_scenario": (mc.gate_per_scenario, False),
                   "layer_norm": (mc.layer_norm, False), "dropout": (mc.dropout, 0.0)}
    bad = {k: v for k, (v, want) in unsupported.items() if v != want}
    if bad:
      raise ValueError(f"torch_reference implements the default SASS only; config.model has {bad}")
    pad = lambda v: -(-int(v) // max(1, mc.vocab_pad_to)) * max(1, mc.vocab_pad_to)
    return cls(mc.user_specs, mc.item_specs, [pad(s.vocab_size) for s in mc.user_specs],
               [pad(s.vocab_size) for s in mc.item_specs], mc.num_scenarios, mc.embed_dim,
               mc.scenario_dim, tuple(mc.widths), mc.out_dim, mc.bias_hidden, mc.activation)

  def _z(self, scenario):
    if scenario is None:
      return self.scenario_embedding[None], None
    onehot = nn.functional.one_hot(scenario, self.k).to(self.scenario_embedding.dtype)
    return onehot @ self.scenario_embedding, onehot

  def encode_user(self, feats, scenario=None):
    return self.user_tower(feats, *self._z(scenario))

  def encode_item(self, feats, scenario=None):
    return self.item_tower(feats, *self._z(scenario))

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
        for mine, theirs in ((layer.glob, "global"), (layer.scenario, "scenario"),
                             (layer.adaptive_gate, "adaptive_gate"),
                             (layer.update_gate, "update_gate")):
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


def sampled_softmax_logq(logits, item_ids, logq, tau: float, alpha: float):
  """In-batch sampled softmax with logQ correction (``losses.sampled_softmax_logq``)."""
  z = (logits / tau - alpha * logq[None, :]).masked_fill(_dup_mask(item_ids), _MASKED)
  return _ce_diag(z).mean()


def finetune_loss(model: TorchSASS, b: Mapping, tau: float, logq_strength: float):
  """Stage-2 loss on a torch batch (``steps.finetune_loss``)."""
  u = model.encode_user(b["user"], b["scenario"])                      # [B, D]
  i_all = model.encode_item(b["item"], None)                           # [B, K, D]
  onehot = nn.functional.one_hot(b["scenario"], model.k).to(u.dtype)
  logits = torch.einsum("bkd,jkd->bj", u[:, None, :] * onehot[:, :, None], i_all)
  return sampled_softmax_logq(logits, b["item_index"], b["item_logq"], tau, logq_strength)


def pretrain_loss(model: TorchSASS, b: Mapping, tau: float, pairs: str):
  """Stage-1 loss on a torch batch (``steps.pretrain_loss``)."""
  if pairs == "user_item":
    u = model.encode_user(b["user"], b["scenario"])
    i = model.encode_item(b["item"], b["scenario"])
    # a column sharing the row's user or its item is masked (as in ``steps.pretrain_loss``)
    logits = (u @ i.T / tau).masked_fill(_dup_mask(b["user_index"]) | _dup_mask(b["item_index"]),
                                         _MASKED)
    return 0.5 * (_ce_diag(logits).mean() + _ce_diag(logits.T).mean())
  if pairs != "scenario_views":
    raise ValueError(f"pairs={pairs!r}; expected 'scenario_views' or 'user_item'")
  u_all, i_all = model.encode_user(b["user"], None), model.encode_item(b["item"], None)
  take = lambda v, idx: torch.gather(v, 1, idx[:, :, None].expand(-1, -1, v.shape[-1]))
  uv, iv = take(u_all, b["user_views"]), take(i_all, b["item_views"])
  return (info_nce(uv[:, 0], uv[:, 1], b["user_index"], tau)
          + info_nce(iv[:, 0], iv[:, 1], b["item_index"], tau))


def to_torch(batch: Mapping, device: str | torch.device = "cpu") -> dict:
  """A NumPy batch of ``sass_jax.data.pipeline.BatchFn`` as torch tensors (ids int64) on
  ``device``."""
  def conv(x):
    x = np.asarray(x)
    return torch.from_numpy(x.astype(np.int64 if x.dtype.kind in "iu" else x.dtype,
                                     copy=True)).to(device)
  return {k: ({f: conv(v) for f, v in x.items()} if isinstance(x, Mapping) else conv(x))
          for k, x in batch.items()}


def make_optimizer(model: nn.Module, lr: float, num_steps: int, warmup: int,
                   weight_decay: float = 0.0):
  """AdamW with the schedule of ``sass_jax.train.steps.make_optimizer`` (linear warm-up from 0,
  cosine decay to 10% at ``num_steps``). Returns (optimizer, LambdaLR scheduler)."""
  warmup = min(int(warmup), max(num_steps - 1, 0))
  decay = max(num_steps, warmup + 1) - warmup

  def factor(step):
    if warmup and step < warmup:
      return step / warmup
    t = min(max(step - warmup, 0), decay) / decay
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

  opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=weight_decay)
  return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def make_step(model: TorchSASS, stage: str, tau: float, lr: float, num_steps: int, warmup: int,
              weight_decay: float = 0.0, logq_strength: float = 1.0,
              pairs: str = "scenario_views") -> Callable[[dict], float]:
  """A training step ``step(torch_batch) -> loss tensor`` (zero_grad, forward, backward, AdamW
  step, schedule step). ``stage`` is 'finetune' or 'pretrain'; raises ValueError otherwise."""
  if stage not in ("finetune", "pretrain"):
    raise ValueError(f"stage={stage!r}; expected 'finetune' or 'pretrain'")
  opt, sched = make_optimizer(model, lr, num_steps, warmup, weight_decay)

  def step(b):
    opt.zero_grad(set_to_none=True)
    if stage == "finetune":
      loss = finetune_loss(model, b, tau, logq_strength)
    else:
      loss = pretrain_loss(model, b, tau, pairs)
    loss.backward()
    opt.step()
    sched.step()
    return loss.detach()
  return step
