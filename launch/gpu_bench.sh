#!/usr/bin/env bash
# The issue-6 benchmark matrix on a lent GPU machine, in one go (target: under 8 minutes).
#
# That machine has Python 3.12 with CUDA JAX, torch, flax, optax, orbax -- but no grain, no
# ml_collections and no internet, and ../shared/data does not travel. So:
#
#   1. Here, once (needs the pip index this repo installs from):
#        launch/gpu_bench.sh --fetch
#      puts the ml_collections wheel and the MovieLens sample into runs/gpu_carry/ (ignored by
#      git via /runs/).
#   2. On the device machine (the `run` tool, carry ["runs/gpu_carry"], timeout_s ~ 590):
#        bash launch/gpu_bench.sh
#      Installs the carried wheel into /tmp/site, then runs, each under its own timeout:
#        - --mode bench on MovieLens (batch 4096), the Ali-CCP-scale synthetic config at
#          batch 4096 and 65536, and synthetic:xlarge (1.1e7 embedding rows; its data takes
#          about 1.5 minutes to generate), with the data resident on the device (no grain);
#        - sass_jax.bench.vs_pytorch (sass_jax vs torch on cuda, eager and torch.compile'd,
#          alternating; grouped scenario compute on both sides) on MovieLens and Ali-CCP-scale
#          at batch 4096, fine-tune and pre-train steps, and the Ali-CCP-scale fine-tune step in
#          bfloat16 mixed precision on both sides;
#        - sass_jax.bench.scaling: SASS fine-tune samples/s and flops per sample for K = 2, 8, 32
#          (synthetic data), negatives 'all' and 'same_scenario';
#      and prints a short table last. JSON results go to $OUT (the run tool's output folder)
#      or runs/gpu_bench_out.
#
# Dry run on a CPU (small sizes, grain hidden, torch on cpu, limits stretched 3x):
#   DRY=1 TSCALE=3 BUDGET=1800 PYTHON=.venv/bin/python launch/gpu_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=runs/gpu_carry

if [[ "${1:-}" == "--fetch" ]]; then
  set -e
  mkdir -p "$CARRY/whl"
  "${PIP:-.venv/bin/pip}" download --no-deps --only-binary=:all: -d "$CARRY/whl" ml-collections==1.1.0
  rm -rf "$CARRY/movielens_1m_sample"
  cp -r ../shared/data/movielens_1m_sample "$CARRY/"
  du -sh "$CARRY"
  exit 0
fi

PY=${PYTHON:-python3}
RES=${OUT:-runs/gpu_bench_out}
WORK=${WORK:-/tmp/sass_gpu_bench}
mkdir -p "$RES" "$WORK"
T0=$(date +%s)
SITE=/tmp/site
if ls "$CARRY"/whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "import ml_collections" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$CARRY"/whl/*.whl || exit 1
  export PYTHONPATH="$SITE:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ -n "${DRY:-}" ]]; then      # hide grain, as on the GPU machine
  mkdir -p "$WORK/nograin/grain"
  echo 'raise ImportError("grain hidden by launch/gpu_bench.sh DRY=1")' > "$WORK/nograin/grain/__init__.py"
  export PYTHONPATH="$WORK/nograin:$PYTHONPATH"
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
ML_DIR=$CARRY/movielens_1m_sample
[[ -d "$ML_DIR" ]] || ML_DIR=../shared/data/movielens_1m_sample
TORCH_DEVICE=cuda
"$PY" - <<'EOF' || exit 1
import jax, torch
print("jax", jax.__version__, jax.devices(), "| torch", torch.__version__,
      "cuda" if torch.cuda.is_available() else "no cuda")
EOF
"$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" || TORCH_DEVICE=cpu

# Sizes: full on the GPU, tiny for a dry run.
if [[ -n "${DRY:-}" ]]; then
  S=(--config.bench.steps=2 --config.bench.repeats=2 --config.bench.warmup=1
     --config.bench.batches=2 --config.bench.loop_steps=2 --config.bench.input_batches=2
     --config.bench.eval_items=512 --config.bench.eval_users=256 --config.bench.probe_matmul_n=256
     --config.bench.probe_bytes=4000000 --config.bench.full_eval_max_pairs=0)
  BS=256; BIG=1024; CMP=(--steps 2 --repeats 1 --rounds 1 --warmup 1 --batches 2)
  SCL=(--ks 2,8 --batch_size 256 --steps 2 --repeats 1 --warmup 1 --batches 2)
  ACS=(--config.data.num_rows=200000 --config.data.num_users=20000 --config.data.num_items=50000)
  XL=(--config.data.num_rows=100000 --config.data.num_users=400000 --config.data.num_items=100000)
else
  S=(--config.bench.steps=20 --config.bench.repeats=3 --config.bench.warmup=3
     --config.bench.batches=8 --config.bench.loop_steps=20 --config.bench.input_batches=20
     --config.bench.eval_items=262144 --config.bench.eval_users=4096)
  BS=4096; BIG=65536; CMP=(--steps 20 --repeats 3 --rounds 2 --warmup 3 --batches 4)
  SCL=(--ks 2,8,32 --batch_size 4096 --steps 10 --repeats 2 --warmup 2 --batches 2)
  ACS=(); XL=()
fi
RESIDENT=(--config.train.resident_on_device=True)

BUDGET=${BUDGET:-465}   # seconds for the whole matrix; each item gets at most what is left
run() {  # run NAME SECONDS python-args...
  local name=$1 secs=$2; shift 2
  secs=$((secs * ${TSCALE:-1}))   # TSCALE: stretch every limit (slow CPU dry runs)
  local left=$((BUDGET - ($(date +%s) - T0)))
  (( secs > left )) && secs=$left
  if (( secs < 20 )); then echo "== $name skipped: the ${BUDGET} s budget is spent"; return 0; fi
  echo "== $name ($(($(date +%s) - T0)) s elapsed, at most $secs s)"
  timeout "$secs" "$PY" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  [[ $rc == 0 ]] || { echo "   $name: exit $rc; last lines:"; tail -n 5 "$WORK/$name.log"; }
  return 0
}
bench() {  # bench NAME SECONDS CONFIG args...
  local name=$1 secs=$2 config=$3; shift 3
  run "$name" "$secs" -m sass_jax.main --config "$config" --workdir "$WORK/$name" --mode bench \
      "${S[@]}" "${RESIDENT[@]}" "$@"
  [[ -f "$WORK/$name/bench.json" ]] && cp "$WORK/$name/bench.json" "$RES/bench_$name.json"
}

# MovieLens tables are tiny (10k rows): row-sparse updates are no use there, so only lazy_adam
# is timed next to dense, without the reference check.
bench ml 80 configs/movielens.py --config.data.dir="$ML_DIR" \
    --config.train.batch_size=$BS --config.pretrain.batch_size=$BS \
    "--config.bench.embedding_optimizers=('dense','lazy_adam')" --config.bench.check_sparse=False
bench acs 120 configs/aliccp_scale.py:sass,$BS "${ACS[@]}"
# Same data (same workdir), batch 65536: the fine-tune step only, dense and lazy_adam.
rm -f "$WORK/acs/bench.json"
run acs_big 75 -m sass_jax.main --config configs/aliccp_scale.py:sass,$BIG --workdir "$WORK/acs" \
    --mode bench "${S[@]}" "${RESIDENT[@]}" "${ACS[@]}" --config.bench.check_sparse=False \
    "--config.bench.embedding_optimizers=('dense','lazy_adam')" "--config.bench.stages=('finetune',)"
[[ -f "$WORK/acs/bench.json" ]] && cp "$WORK/acs/bench.json" "$RES/bench_acs_big.json"
bench xl 170 configs/synthetic.py:xlarge "${XL[@]}" "--config.bench.stages=('finetune',)" \
    --config.train.batch_size=$BS
# vs_pytorch in the bench workdirs: the data prepared there is reused.
run cmp_ml 50 -m sass_jax.bench.vs_pytorch --config configs/movielens.py --workdir "$WORK/ml" \
    --batch_size $BS --device $TORCH_DEVICE "${CMP[@]}" --override "data.dir=$ML_DIR"
[[ -f "$WORK/ml/compare.json" ]] && cp "$WORK/ml/compare.json" "$RES/compare_ml.json"
run cmp_acs 60 -m sass_jax.bench.vs_pytorch --config configs/aliccp_scale.py --workdir "$WORK/acs" \
    --batch_size $BS --device $TORCH_DEVICE "${CMP[@]}" "${ACS[@]/#--config./--override=}"
[[ -f "$WORK/acs/compare.json" ]] && cp "$WORK/acs/compare.json" "$RES/compare_acs.json"
rm -f "$WORK/acs/compare.json"
# The same with the dense [B, B] in-batch softmax (model.inbatch_softmax='dense'): the row-blocked
# default (sass_jax/train/inbatch.py) was measured on CPU only; this decides it for the GPU.
run cmp_acs_dense 50 -m sass_jax.bench.vs_pytorch --config configs/aliccp_scale.py \
    --workdir "$WORK/acs" --batch_size $BS --device $TORCH_DEVICE "${CMP[@]}" \
    "${ACS[@]/#--config./--override=}" --override model.inbatch_softmax=dense
[[ -f "$WORK/acs/compare.json" ]] && cp "$WORK/acs/compare.json" "$RES/compare_acs_dense.json"
rm -f "$WORK/acs/compare.json"
run cmp_acs_pre 60 -m sass_jax.bench.vs_pytorch --config configs/aliccp_scale.py \
    --workdir "$WORK/acs" --stage pretrain --batch_size $BS --device $TORCH_DEVICE "${CMP[@]}" \
    "${ACS[@]/#--config./--override=}"
[[ -f "$WORK/acs/compare.json" ]] && cp "$WORK/acs/compare.json" "$RES/compare_acs_pre.json"
rm -f "$WORK/acs/compare.json"
# Mixed precision on both sides: sass_jax's bfloat16 towers (float32 accumulation,
# sass_jax.model.mixed) against the torch reference under torch.autocast(bfloat16).
run cmp_acs_bf16 50 -m sass_jax.bench.vs_pytorch --config configs/aliccp_scale.py \
    --workdir "$WORK/acs" --batch_size $BS --device $TORCH_DEVICE "${CMP[@]}" \
    "${ACS[@]/#--config./--override=}" --override model.compute_dtype=bfloat16
[[ -f "$WORK/acs/compare.json" ]] && cp "$WORK/acs/compare.json" "$RES/compare_acs_bf16.json"
run scaling 60 -m sass_jax.bench.scaling --workdir "$WORK/scaling" --models sass "${SCL[@]}"
[[ -f "$WORK/scaling/scaling.json" ]] && cp "$WORK/scaling/scaling.json" "$RES/scaling.json"
# The JSON files, the logs in one archive, and the summary below come back.
tar czf "$RES/logs.tgz" -C "$WORK" $(cd "$WORK" && ls *.log) 2>/dev/null

echo "== done in $(($(date +%s) - T0)) s; results in $RES"
"$PY" - "$RES" <<'EOF' | tee "$RES/summary.txt"
import glob, json, os, sys
rows = []
for f in sorted(glob.glob(os.path.join(sys.argv[1], "bench_*.json"))):
  r = json.load(open(f))
  name = os.path.basename(f)[6:-5]
  for k, s in r["steps"].items():
    rows.append((name, k, s["batch_size"], s["step_ms"]["median"], s["samples_per_s"]["median"],
                 s.get("step_over_floor", float("nan")), s.get("floor", {}).get("bound", "")))
  if "loop" in r:
    rows.append((name, f"loop/{r['loop']['source']}", r["steps"][next(iter(r["steps"]))]["batch_size"],
                 r["loop"]["step_ms"]["median"], r["loop"]["samples_per_s"]["median"], float("nan"), ""))
  for o, x in r.get("table_update_speedup", {}).items():
    rows.append((name, f"table update dense/{o}", "", float("nan"), x, float("nan"), ""))
for f in sorted(glob.glob(os.path.join(sys.argv[1], "compare_*.json"))):
  r = json.load(open(f))
  for impl, s in r["summary"].items():
    if not isinstance(s, dict) or "ratio_median_of_rounds" not in s:
      continue
    rows.append((os.path.basename(f)[8:-5], f"{impl}/torch ratio", r["batch_size"], float("nan"),
                 s["ratio_median_of_rounds"], float("nan"), ""))
print(f"{'run':8} {'what':34} {'batch':>6} {'ms/step':>9} {'samples/s|x':>12} {'/floor':>7} bound")
for n, k, b, ms, sps, fl, bound in rows:
  print(f"{n:8} {k:34} {b!s:>6} {ms:9.2f} {sps:12.1f} {fl:7.1f} {bound}")
EOF
