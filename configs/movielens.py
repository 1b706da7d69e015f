"""SASS on MovieLens-1M with three age scenarios (docs/design.md §1, §2, 4, 5).

Usage:
  python -m sass_jax.main --config configs/movielens.py --workdir runs/ml --mode train
  # SASS-Base (no pre-training):  --config configs/movielens.py:sass_base
"""
import os

import ml_collections

# The shared samples sit beside the repository (../shared/data), whatever the working directory.
SHARED_DATA = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def get_config(arg: str = "sass") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "movielens"
  c.data.dir = os.path.join(SHARED_DATA, "movielens_1m_sample")
  c.data.download = False          # fetch ml-1m.zip from GroupLens into data.dir (MD5 checked)
  c.data.on_error = "strict"       # 'strict': bad rows raise; 'skip': count and drop them
  # A (user, movie) rated on two lines: GroupLens' ratings are unique per pair, so a repeat is
  # an error in the file ('error': a bad row naming both lines, dropped and counted under
  # on_error='skip'); 'first' / 'last' keep one line and count the others in the manifest's
  # rows_merged, 'max' keeps the first with the highest rating, 'keep' keeps all (and counts).
  c.data.duplicates = "error"
  c.data.split = (0.8, 0.1, 0.1)   # random train / valid / test split of the rating rows
  c.data.split_seed = 42
  c.data.zip_prefix_len = 3
  c.data.min_count = 1             # values seen fewer times in the training split map to id 0
  c.data.max_genres = 6

  c.model = ml_collections.ConfigDict()
  c.model.name = arg               # 'sass', 'sass_base' (SASS without pre-training) or a baseline:
  #   'dssm_single', 'dssm_mixed', 'shared_bottom', 'mmoe', 'ple', 'star' (docs/design.md §3)
  c.model.embed_dim = 16           # per field
  c.model.scenario_dim = 16        # d_s of the scenario embedding z_k
  c.model.widths = (256, 128)      # ML-SAT layer widths
  c.model.out_dim = 64
  c.model.activation = "relu"
  c.model.dropout = 0.0
  c.model.layer_norm = False
  c.model.gate_style = "gated_sum"  # 'gated_sum' (documented default (docs/design.md)), 'gru', or 'none' (g + s)
  c.model.gate_per_scenario = False  # gate weights per scenario instead of shared with z_k input
  c.model.bias_mode = "add"        # scenario bias net: 'add' to the output or 'concat'
  c.model.bias_hidden = 32
  c.model.tau = 0.05               # score = <r_u, r_i> / tau
  c.model.vocab_pad_to = 8         # embedding rows rounded up (even row-sharding over 'model')
  c.model.compute_dtype = "float32"
  # Per-scenario layers and in-batch logits: 'grouped' multiplies each row by its own
  # scenario's weights only; 'onehot' (the earlier formulation) by all K, keeping one. Same
  # model, same parameters and results (sass_jax/model/grouped.py).
  c.model.scenario_compute = "grouped"
  # Baselines only (sass_jax/model/baselines.py); `widths` above are their MLP / expert widths.
  c.model.tower_widths = (64,)     # per-scenario head of shared_bottom / mmoe / ple (then out_dim)
  c.model.num_experts = 4          # mmoe experts; ple shared experts per extraction layer
  c.model.num_scenario_experts = 2  # ple experts per scenario per layer (len(widths) layers)
  c.model.separate_embeddings = True  # dssm_single: one set of embedding tables per scenario
  c.model.star_aux = True          # star: auxiliary network of [z_k ; e] added to the output
  c.model.star_momentum = 0.99     # star: momentum of the per-scenario running statistics

  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.num_steps = 0 if arg == "sass_base" else 600
  c.pretrain.batch_size = 512
  c.pretrain.learning_rate = 1e-3
  c.pretrain.tau = 0.1             # tau_pre of the pre-training InfoNCE
  c.pretrain.pairs = "scenario_views"  # or 'user_item' (docs/design.md §2, second reading)

  c.train = ml_collections.ConfigDict()   # stage 2: fine-tuning
  c.train.num_steps = 1000
  c.train.batch_size = 512
  c.train.learning_rate = 1e-3
  c.train.weight_decay = 0.0
  c.train.warmup_steps = 100
  c.train.logq_strength = 1.0      # alpha of the logQ correction; 0 turns it off
  # In-batch negatives of a row: 'all' the batch's items, each scored in the row's scenario
  # (items encoded in every scenario: cost grows with K), or 'same_scenario' only the items
  # of rows of the same scenario (each item encoded once: cost independent of K).
  c.train.negatives = "all"
  c.train.log_every = 50
  # Non-finite loss / gradient norm / parameter norm (both stages): 'raise' stops the run
  # naming the step (the last checkpoint is the last good state); 'skip' discards that step's
  # update (logged as skipped_steps) and raises after max_skips consecutive skips.
  c.train.nan_policy = "raise"
  c.train.max_skips = 10
  c.train.debug_nan_at_step = 0    # testing hook: > 0 makes that step's loss NaN (0 = off)
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
  c.checkpoint.every_steps = 500
  c.checkpoint.max_to_keep = 2

  c.eval = ml_collections.ConfigDict()
  c.eval.split = "test"
  c.eval.ks = (20, 50, 100)
  c.eval.user_chunk = 1024
  c.eval.mask = "train"            # items masked per user: 'train' positives or 'train_valid'
  # Items ranked in scenario k: 'all' (the whole corpus, docs/design.md §5) or 'scenario' (only
  # items seen in scenario k: for scenarios that are domains with their own items).
  c.eval.corpus = "all"
  # Which fine-tuning step: 0 = the latest. If the latest cannot be read, evaluation stops
  # (naming it; the step is set aside as <step>.unreadable) unless fallback=True, which
  # evaluates the newest readable step instead.
  c.eval.step = 0
  c.eval.fallback = False

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                 # -1: all devices not used by the other axis
  c.mesh.model = 1
  c.mesh.shard_min_rows = 100_000  # tables with fewer rows are replicated
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
  c.compile.topology = "v5e:2x2"   # a TPU topology ('v5e:16x16', 'v5p:8x8x8', ...) or 'cpu'
  c.compile.mesh = ()              # (data, model) for that topology; () = config.mesh
  c.compile.hbm_bytes = 0          # per-chip memory to report against; 0 = the chip's own
  c.compile.stages = ("pretrain", "finetune")
  c.compile.embedding_optimizers = ("dense", "lazy_adam", "rowwise_adagrad")
  # Fields to compile for without prepared data: ((name, vocab_size, multi_hot L or 0), ...)
  # per tower and the number of scenarios; () / 0 = read them from WORKDIR/data.
  c.compile.user_fields = ()
  c.compile.item_fields = ()
  c.compile.num_scenarios = 0

  c.bench = ml_collections.ConfigDict()   # --mode bench (sass_jax/bench/throughput.py)
  c.bench.steps = 20               # timed steps per repeat
  c.bench.warmup = 3               # untimed steps before each repeat
  c.bench.repeats = 5              # median / min / max over these
  c.bench.batches = 8              # distinct batches, placed beforehand, cycled by the step timings
  c.bench.stages = ("pretrain", "finetune")
  # Fine-tune step timed once per embedding optimiser (the pre-train step with
  # config.train.embedding_optimizer, which the whole-loop timing uses too).
  c.bench.embedding_optimizers = ("dense", "lazy_adam", "rowwise_adagrad")
  c.bench.check_sparse = True      # one step of each sparse optimiser vs its masked dense reference
  c.bench.loop_steps = 20          # steps per repeat of the whole loop (input + placement + step)
  c.bench.input_batches = 50       # batches per repeat of the input-only timing
  c.bench.eval_items = 65536       # items encoded (in every scenario) by the evaluation timing
  c.bench.eval_users = 4096        # users encoded and ranked against a corpus of num_items
  c.bench.eval_topk_scores = 2e9   # ... but at most this many user x item scores ranked
  c.bench.full_eval_max_pairs = 1e9  # also time evaluate() when users x items <= this
  c.bench.probe = True             # measure matmul FLOP/s and copy bandwidth (the floor)
  c.bench.probe_matmul_n = 0       # probe sizes; 0 = 2048 / 256 MiB on CPU, 8192 / 2 GiB else
  c.bench.probe_bytes = 0

  c.compare = ml_collections.ConfigDict()  # --mode compare (sass_jax/compare.py)
  c.compare.models = ("dssm_single", "dssm_mixed", "shared_bottom", "mmoe", "ple", "star",
                      "sass_base", "sass")   # names from sass_jax.compare.VARIANTS
  c.compare.seeds = 5              # test runs per model: seeds seed .. seed + seeds - 1
  # The tuning grid, the same for every model: learning_rates x taus x widths, each () = the
  # config's own value. A grid of one point means no tuning runs.
  c.compare.learning_rates = ()    # e.g. (1e-3, 3e-3)
  c.compare.taus = (0.1, 0.2)      # temperature: the most sensitive value (RESULTS.md)
  c.compare.widths = ()            # e.g. ((256, 128), (128, 64))
  c.compare.select_metric = "recall@50"  # overall, on the validation split
  c.compare.results_dir = "results"
  c.compare.name = ""              # results file name; '' = the data set's name

  # Values above are the documented defaults (docs/design.md). These were chosen on the MovieLens *validation* split
  # (RESULTS.md: the runs compared); set them back to compare with the documented defaults (docs/design.md).
  c.model.tau = 0.2
  c.train.logq_strength = 1.5
  c.pretrain.pairs = "user_item"
  c.pretrain.tau = 0.2

  c.recommend = ml_collections.ConfigDict()  # --mode recommend (sass_jax/export.py)
  c.recommend.user = ""            # raw user id, as in the source data (e.g. '42')
  c.recommend.scenario = ""        # scenario name (the data's scenario_names)
  c.recommend.k = 10
  c.recommend.exclude_seen = True  # drop the items config.eval.mask masks in evaluation

  c.export = ml_collections.ConfigDict()  # --mode export (sass_jax/export.py)
  c.export.dir = ""                # '' = WORKDIR/export
  c.export.platforms = ("cpu", "cuda", "tpu")  # jax.export lowering targets of the user encoder
  return c
