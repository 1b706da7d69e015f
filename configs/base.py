"""Base config: every key of a run config with its documented default (docs/design.md §6).

Each data set's config (configs/movielens.py, douban.py, ...) starts from ``get_config()``,
replaces ``config.data`` with its own keys (data-specific, documented there) and overrides only
what differs, saying where each value came from. ``apply_model_arg`` turns the config argument
(``--config configs/x.py:ARG``) into the model: a model name, or 'sass_base' (SASS without
pre-training).

Where the defaults come from: the model / stage values are the documented defaults of
docs/design.md, except four chosen on the MovieLens-1M sample's *validation* split (RESULTS.md,
"MovieLens-1M sample"): model.tau 0.2, train.logq_strength 1.5, pretrain.pairs 'user_item',
pretrain.tau 0.2. They are NOT tuned on any other data set. Step counts and batch sizes are sized
for the MovieLens sample (80k training ratings); data sets of other sizes override them.
"""

import os

import ml_collections

# The shared samples sit beside the repository (../shared/data), whatever the working directory.
SHARED_DATA = os.path.normpath(
  os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
)

# The config argument 'sass_base': SASS without pre-training (model.name 'sass', no stage 1).
SASS_BASE = "sass_base"


def apply_model_arg(c: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
  """Set the model from a config argument; returns ``c`` (changed in place).

  arg: a model name (``config.model.name``: 'sass' or a baseline, docs/design.md §3), or
    'sass_base' = model.name 'sass' with ``pretrain.num_steps = 0`` (SASS-Base). Call it last in
    a data set's ``get_config``, after its own ``pretrain.num_steps``. An unknown name is
    reported by the config check (``config.model.name``).
  """
  if arg == SASS_BASE:
    c.model.name = "sass"
    c.pretrain.num_steps = 0
  else:
    c.model.name = arg
  return c


def get_config(arg: str = "sass") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # int: parameter init and batch order (stage 2 uses seed + 1)

  # Data-specific: each data set's config replaces this block with its own keys (every key of
  # config.data is part of the prepared data's identity; sass_jax/data).
  c.data = ml_collections.ConfigDict()
  c.data.name = ""  # the loader (sass_jax.data.get_preparer), e.g. 'movielens'

  c.model = ml_collections.ConfigDict()
  c.model.name = "sass"  # 'sass' or a baseline: 'dssm_single', 'dssm_mixed',
  #   'shared_bottom', 'mmoe', 'ple', 'star' (docs/design.md §3); set through apply_model_arg
  c.model.embed_dim = 16  # int >= 1: embedding width per field
  c.model.scenario_dim = 16  # int >= 1: d_s of the scenario embedding z_k
  c.model.widths = (256, 128)  # positive ints: ML-SAT layer widths (baselines: MLP / experts)
  c.model.out_dim = 64  # int >= 1: width of the user / item representations
  c.model.activation = "relu"  # hidden activation (sass_jax/model/mlsat.py), e.g. 'gelu'
  c.model.dropout = 0.0  # rate in [0, 1); 0 = none
  c.model.layer_norm = False  # layer norm after each ML-SAT layer
  # 'gated_sum' (documented default, docs/design.md), 'gru', or 'none' (g + s)
  c.model.gate_style = "gated_sum"
  c.model.gate_per_scenario = False  # gate weights per scenario instead of shared with z_k input
  c.model.bias_mode = "add"  # scenario bias net: 'add' to the output or 'concat'
  # SASS's item tower: 'specific' (the paper: an item vector per scenario) or 'agnostic' (an
  # ablation: one vector for all scenarios, scenario 0's path; sass_jax/claims.py, claim c)
  c.model.item_scenario = "specific"
  # ... and the same for the user tower ('agnostic': one user vector for all scenarios; the
  # Amazon cold-start study in RESULTS.md)
  c.model.user_scenario = "specific"
  # SASS only: True appends a user bias b_u and an item bias c_i (one scalar per entity and
  # scenario, linear in the last hidden layer) to the towers' vectors, so that the score
  # <r_u', r_i'> / tau = <r_u, r_i> / tau + b_u + c_i (docs/design.md §1, "score biases"):
  # calibration for a binary loss on labelled exposures (train.labelled_weight). Tried for the
  # MovieLens AUC: no gain (results/labelled_negatives.md).
  c.model.score_bias = False
  # SASS only: int >= 0. P > 0 adds a preference head of P dims to each tower, beside the
  # retrieval vector: the labelled BCE (train.labelled_weight) and AUC / GAUC score
  # <r_u, r_i> / tau + <q_u, q_i>; the softmax, pre-training and top-K use <r_u, r_i> only
  # (docs/design.md §1, "preference head"; results/labelled_negatives.md). 0: off.
  c.model.preference_dim = 0
  # the head's input: 'own' field embeddings (the BCE then trains no retrieval parameter) or
  # 'shared' (the tower's last hidden layer: the BCE trains the tower too, trading Recall)
  c.model.preference_input = "own"
  c.model.preference_widths = (128, 64)  # positive ints: the head's hidden layers (ReLU)
  c.model.preference_dropout = 0.2  # rate in [0, 1): dropout after each hidden layer
  c.model.bias_hidden = 32  # int >= 1: hidden width of the scenario bias net
  # Score = <r_u, r_i> / tau (> 0). Documented default 0.05; 0.2 was chosen on the MovieLens
  # validation split only (RESULTS.md: SASS-Base 0.1219 at 0.05, 0.1679 at 0.2).
  c.model.tau = 0.2
  c.model.vocab_pad_to = 8  # int >= 1: embedding rows rounded up (even row-sharding)
  c.model.compute_dtype = "float32"  # 'float32' or 'bfloat16' (activations; params stay f32)
  # Per-scenario layers and in-batch logits: 'grouped' multiplies each row by its own
  # scenario's weights only; 'onehot' (the earlier formulation) by all K, keeping one. Same
  # model, same parameters and results (sass_jax/model/grouped.py).
  c.model.scenario_compute = "grouped"
  # The training losses' in-batch softmax: 'blocked' computes it in tiles of rows, loss and
  # gradient in one pass, never holding the [B, B] logits (products in compute_dtype with
  # float32 accumulation); 'dense' writes the [B, B] logits in float32. Same loss to float32
  # rounding (sass_jax/train/inbatch.py). On a mesh with a 'data' axis the dense form is used.
  c.model.inbatch_softmax = "blocked"
  # Baselines only (sass_jax/model/baselines.py); `widths` above are their MLP / expert widths.
  c.model.tower_widths = (64,)  # per-scenario head of shared_bottom / mmoe / ple (then out_dim)
  c.model.num_experts = 4  # int >= 1: mmoe experts; ple shared experts per layer
  c.model.num_scenario_experts = 2  # int >= 1: ple experts per scenario per layer
  c.model.separate_embeddings = True  # dssm_single: one set of embedding tables per scenario
  c.model.star_aux = True  # star: auxiliary network of [z_k ; e] added to the output
  c.model.star_momentum = 0.99  # star: momentum in [0, 1) of the per-scenario running stats

  c.pretrain = ml_collections.ConfigDict()  # stage 1: scenario pre-training (SASS only)
  c.pretrain.num_steps = 600  # int >= 0; 0 = no pre-training (sized for MovieLens)
  c.pretrain.batch_size = 512  # int >= 1, divisible by the mesh's data axis
  c.pretrain.learning_rate = 1e-3  # peak AdamW learning rate (> 0)
  c.pretrain.warmup_steps = 0  # int >= 0: linear warm-up steps, then cosine decay to 10%
  c.pretrain.weight_decay = 0.0  # AdamW weight decay (>= 0)
  # tau_pre of the pre-training InfoNCE (> 0). Documented default 0.1; 0.2 was chosen on the
  # MovieLens validation split only, with pairs='user_item' (RESULTS.md: 0.1960 vs 0.1789 at 0.5).
  c.pretrain.tau = 0.2
  # 'scenario_views' (documented default: two scenario views of a user) or 'user_item' (the
  # second reading, docs/design.md §2). 'user_item' was chosen on the MovieLens validation split
  # only (RESULTS.md: 0.1960 vs 0.1777 for scenario_views).
  c.pretrain.pairs = "user_item"

  c.train = ml_collections.ConfigDict()  # stage 2: fine-tuning
  c.train.num_steps = 1000  # int >= 1 (sized for the MovieLens sample)
  c.train.batch_size = 512  # int >= 1, divisible by the mesh's data axis
  c.train.learning_rate = 1e-3  # peak AdamW learning rate (> 0)
  c.train.weight_decay = 0.0  # AdamW weight decay (>= 0)
  c.train.warmup_steps = 100  # int >= 0: linear warm-up steps, then cosine decay to 10%
  # alpha of the logQ correction (>= 0; 0 turns it off). Documented default 1.0; 1.5 was chosen
  # on the MovieLens validation split only (RESULTS.md: 0.1907 vs 0.1679 at 1.0, with tau 0.2).
  c.train.logq_strength = 1.5
  # In-batch negatives of a row: 'all' the batch's items, each scored in the row's scenario
  # (items encoded in every scenario: cost grows with K), or 'same_scenario' only the items
  # of rows of the same scenario (each item encoded once: cost independent of K).
  c.train.negatives = "all"
  # Labelled negatives of the entire space (docs/design.md §2, stage 2): weight (>= 0) of a
  # binary cross-entropy on a second batch of labelled training exposures (label 1 and 0, every
  # labelled row of the training split), added to the sampled softmax; 0 = off (no extra batch).
  c.train.labelled_weight = 0.0
  c.train.labelled_batch_size = 0  # int >= 0: rows of that batch; 0 = train.batch_size
  c.train.log_every = 50  # int >= 1: steps between log lines / TensorBoard points
  # Non-finite loss / gradient norm / parameter norm (both stages): 'raise' stops the run
  # naming the step (the last checkpoint is the last good state); 'skip' discards that step's
  # update (logged as skipped_steps) and raises after max_skips consecutive skips.
  c.train.nan_policy = "raise"
  c.train.max_skips = 10  # int >= 1
  c.train.debug_nan_at_step = 0  # testing hook: > 0 makes that step's loss NaN (0 = off)
  # Embedding tables (both stages; sass_jax/train/sparse.py): 'dense' (AdamW on every row of
  # every table each step, the reference), 'lazy_adam' (Adam on the batch's rows only) or
  # 'rowwise_adagrad' (one accumulator per row, batch rows only).
  c.train.embedding_optimizer = "dense"
  c.train.embedding_learning_rate = 0.0  # row-sparse tables' peak lr; 0 = the stage's learning_rate
  # Keep the stage's training rows and entity tables on the device and sample batches there
  # (sass_jax/data/resident.py; every training mode and bench; one process only). Not under
  # config.data, whose every key is part of the prepared data's identity.
  c.train.resident_on_device = False

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500  # int >= 1 (a checkpoint is also written at the last step)
  c.checkpoint.max_to_keep = 2  # int >= 1, or None = keep all

  c.eval = ml_collections.ConfigDict()
  c.eval.split = "test"  # 'valid' or 'test'
  c.eval.ks = (20, 50, 100)  # positive ints <= number of items: cut-offs of Recall@K etc.
  c.eval.user_chunk = 1024  # int >= 1: users scored per device call
  c.eval.mask = "train"  # items masked per user: 'train' positives or 'train_valid'
  # Items ranked in scenario k: 'all' (the whole corpus, docs/design.md §5) or 'scenario' (only
  # items seen in scenario k: for scenarios that are domains with their own items).
  c.eval.corpus = "all"
  # Which fine-tuning step: 0 = the latest. If the latest cannot be read, evaluation stops
  # (naming it; the step is set aside as <step>.unreadable) unless fallback=True, which
  # evaluates the newest readable step instead.
  c.eval.step = 0
  c.eval.fallback = False

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # devices on the 'data' axis; -1: all not used by 'model'
  c.mesh.model = 1  # devices on the 'model' axis (or -1, not both)
  c.mesh.shard_min_rows = 100_000  # int >= 0: tables with fewer rows are replicated
  # Tables with more rows are split: 'all' over every device (data x model), 'model' over the
  # model axis (a copy per data coordinate), 'auto' = 'all' where the rows divide evenly.
  c.mesh.table_layout = "auto"
  # Per-device memory a step may use (bytes); 0 = the device's own limit (memory_stats()
  # 'bytes_limit'; CPU reports none: no check). Each stage's step is compiled first and the run
  # stops if it needs more (sass_jax/aot.py, preflight).
  c.mesh.memory_limit_bytes = 0

  # --mode compile (sass_jax/aot.py; docs/scaling.md): compile the real steps for a device
  # topology that need not be present, from abstract state and batch, and report per-chip
  # memory, FLOPs and collectives to WORKDIR/compile.json.
  c.compile = ml_collections.ConfigDict()
  c.compile.topology = "v5e:2x2"  # a TPU topology ('v5e:16x16', 'v5p:8x8x8', ...) or 'cpu'
  c.compile.mesh = ()  # (data, model) for that topology; () = config.mesh
  c.compile.hbm_bytes = 0  # per-chip memory (bytes) to report against; 0 = the chip's own
  c.compile.stages = ("pretrain", "finetune")  # stages compiled, subset of these
  c.compile.embedding_optimizers = ("dense", "lazy_adam", "rowwise_adagrad")  # each compiled
  # Fields to compile for without prepared data: ((name, vocab_size, multi_hot L or 0), ...)
  # per tower and the number of scenarios; () / 0 = read them from WORKDIR/data.
  c.compile.user_fields = ()
  c.compile.item_fields = ()
  c.compile.num_scenarios = 0

  c.bench = ml_collections.ConfigDict()  # --mode bench (sass_jax/bench/throughput.py)
  c.bench.steps = 20  # int >= 1: timed steps per repeat
  c.bench.warmup = 3  # int >= 0: untimed steps before each repeat
  c.bench.repeats = 5  # int >= 1: median / min / max over these
  c.bench.batches = 8  # int >= 1: distinct batches, placed beforehand, cycled
  c.bench.stages = ("pretrain", "finetune")  # subset of these
  # Fine-tune step timed once per embedding optimiser (the pre-train step with
  # config.train.embedding_optimizer, which the whole-loop timing uses too).
  c.bench.embedding_optimizers = ("dense", "lazy_adam", "rowwise_adagrad")
  c.bench.check_sparse = True  # one step of each sparse optimiser vs its masked dense reference
  c.bench.loop_steps = 20  # int >= 1: steps per repeat of the whole loop (input + step)
  c.bench.input_batches = 50  # int >= 1: batches per repeat of the input-only timing
  c.bench.eval_items = 65536  # items encoded (in every scenario) by the evaluation timing
  c.bench.eval_users = 4096  # users encoded and ranked against a corpus of eval_items
  c.bench.eval_topk_scores = 2e9  # ... but at most this many user x item scores ranked
  c.bench.full_eval_max_pairs = 1e9  # also time evaluate() when users x items <= this
  c.bench.probe = True  # measure matmul FLOP/s and copy bandwidth (the floor)
  c.bench.probe_matmul_n = 0  # probe sizes; 0 = 2048 / 256 MiB on CPU, 8192 / 2 GiB else
  c.bench.probe_bytes = 0  # bytes copied by the bandwidth probe; 0 = as above

  c.compare = ml_collections.ConfigDict()  # --mode compare (sass_jax/compare.py)
  c.compare.models = (
    "dssm_single",
    "dssm_mixed",
    "shared_bottom",
    "mmoe",
    "ple",
    "star",
    "sass_base",
    "sass",
  )  # names from sass_jax.compare.known_variants()
  c.compare.seeds = 5  # int >= 1: test runs per model: seeds seed .. seed + seeds - 1
  # The tuning grid, the same for every model: learning_rates x taus x widths, each () = the
  # config's own value. A grid of one point means no tuning runs.
  c.compare.learning_rates = ()  # e.g. (1e-3, 3e-3)
  c.compare.taus = (0.1, 0.2)  # temperature: the most sensitive value (RESULTS.md)
  c.compare.widths = ()  # e.g. ((256, 128), (128, 64))
  # 'grid': the grid above; 'random': `trials` distinct points drawn from `space` (and, for
  # variants that pre-train, `pretrain_space`) with numpy.random.default_rng(seed) (the
  # pre-training dimensions with seed + 1): every variant gets the same draws and the same count.
  c.compare.search = "grid"
  c.compare.trials = 12  # int >= 1: random-search points per variant (fewer if the space is)
  # ((dotted config path, (choices, ...)), ...): the random-search space shared by every variant.
  c.compare.space = (
    ("train.learning_rate", (3e-4, 1e-3, 3e-3)),
    ("model.tau", (0.05, 0.1, 0.2, 0.3)),
    ("train.logq_strength", (0.0, 0.5, 1.0, 1.5)),
    ("model.widths", ((256, 128), (128, 64))),
  )
  # ... and the dimensions added for variants that pre-train (pretrain.num_steps > 0 after the
  # variant's overrides); a path a variant fixes (e.g. sass_user_item's pretrain.pairs) is
  # left out of that variant's space.
  c.compare.pretrain_space = (
    ("pretrain.tau", (0.1, 0.2, 0.5)),
    ("pretrain.num_steps", (300, 600, 1200)),
    ("pretrain.pairs", ("user_item", "scenario_views")),
  )
  c.compare.select_metric = "recall@50"  # metric (overall, validation split) choosing a point
  # Paired t-test over seeds (select_metric, test split) of this variant vs the best other
  # model by mean, per scenario and overall; needs seeds >= 2 and the variant among the models.
  c.compare.reference = "sass"
  c.compare.results_dir = "results"  # where <name>.md / .json / .png are written
  c.compare.name = ""  # results file name; '' = the data set's name

  c.recommend = ml_collections.ConfigDict()  # --mode recommend (sass_jax/export.py)
  c.recommend.user = ""  # raw user id, as in the source data (e.g. '42')
  c.recommend.scenario = ""  # scenario name (the data's scenario_names)
  c.recommend.k = 10  # int >= 1: items returned
  c.recommend.exclude_seen = True  # drop the items config.eval.mask masks in evaluation

  c.export = ml_collections.ConfigDict()  # --mode export (sass_jax/export.py)
  c.export.dir = ""  # '' = WORKDIR/export
  c.export.platforms = ("cpu", "cuda", "tpu")  # jax.export lowering targets of the user encoder
  return apply_model_arg(c, arg)
