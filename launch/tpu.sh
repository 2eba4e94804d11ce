#!/usr/bin/env bash
# Cloud TPU launcher for kimi_vl_jax: create a TPU VM (directly or as a queued resource), install
# the package on every host, run the same command on every host, and the multi-slice variants.
#
#   launch/tpu.sh create            # gcloud compute tpus tpu-vm create (on-demand / spot)
#   launch/tpu.sh queue             # gcloud compute tpus queued-resources create (waits for capacity)
#   launch/tpu.sh status            # state of the VM / queued resource
#   launch/tpu.sh install           # clone REPO_URL@REF on every host, pip install -e '.[tpu]'
#   launch/tpu.sh run [ARGS...]     # python -m kimi_vl_jax.main ARGS on every host (foreground
#                                   # over ssh; each host also logs to ~/kimi_vl_run.log)
#   launch/tpu.sh aot [ARGS...]     # python -m kimi_vl_jax.aot ARGS on host 0 only
#   launch/tpu.sh ssh CMD           # any command on every host
#   launch/tpu.sh delete            # delete the VM / queued resource
#   NUM_SLICES=2 launch/tpu.sh queue|install|run|delete   # multi-slice (DCN) over N slices
#
# Settings (environment variables; defaults in brackets):
#   TPU_NAME [kimi-vl]  ZONE [us-east5-a]  PROJECT [gcloud's default]  ACCEL [v5p-256]
#   RUNTIME [picked from ACCEL]  SPOT [0]  NUM_SLICES [1]
#   REPO_URL [the origin URL of this checkout]  REF [main]  WORKDIR [gs://... or a local path]
#   DRY_RUN [0]: print the gcloud commands instead of running them.
#
# Every host runs the same command; `kimi_vl_jax.parallel.distributed.maybe_initialize()` then
# finds the other hosts from the TPU environment (TPU_WORKER_HOSTNAMES, and MEGASCALE_* on
# multi-slice queued resources), so no per-host arguments are needed. WORKDIR must be shared by
# all hosts (a gs:// bucket) for checkpoints.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TPU_NAME="${TPU_NAME:-kimi-vl}"
ZONE="${ZONE:-us-east5-a}"
ACCEL="${ACCEL:-v5p-256}"
SPOT="${SPOT:-0}"
NUM_SLICES="${NUM_SLICES:-1}"
REF="${REF:-main}"
DRY_RUN="${DRY_RUN:-0}"
REPO_URL="${REPO_URL:-$(git -C "$HERE/.." remote get-url origin 2>/dev/null || true)}"
WORKDIR="${WORKDIR:-\$HOME/kimi_vl_workdir}"
REMOTE_DIR='$HOME/kimi_vl_jax'
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project="$PROJECT"); fi

default_runtime() {
  case "$1" in
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5e-*|v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) echo "unknown accelerator type $1 (expected v4-*, v5p-*, v5e-*, v6e-*)" >&2; return 1 ;;
  esac
}
RUNTIME="${RUNTIME:-$(default_runtime "$ACCEL")}"
# gcloud spells v5e slices "v5litepod-N".
GCLOUD_ACCEL="${ACCEL/v5e-/v5litepod-}"

run() {
  if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# Node names: one VM for a single slice; NAME-0 .. NAME-(N-1) for a multi-slice queued resource.
nodes() {
  if (( NUM_SLICES > 1 )); then
    for ((i = 0; i < NUM_SLICES; i++)); do echo "${TPU_NAME}-${i}"; done
  else
    echo "$TPU_NAME"
  fi
}

on_all_hosts() {  # on_all_hosts CMD: the same command on every host of every slice, in parallel
  local cmd="$1" pids=()
  for node in $(nodes); do
    if [[ "$DRY_RUN" == 1 ]]; then  # printed in order, not interleaved
      run gcloud compute tpus tpu-vm ssh "$node" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
        --worker=all --command="$cmd"
      continue
    fi
    run gcloud compute tpus tpu-vm ssh "$node" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
      --worker=all --command="$cmd" &
    pids+=($!)
  done
  local rc=0
  for p in "${pids[@]+"${pids[@]}"}"; do wait "$p" || rc=$?; done
  return $rc
}

need_repo() {
  if [[ -z "$REPO_URL" ]]; then
    echo "set REPO_URL to a git URL the TPU hosts can clone (this checkout has no origin)" >&2
    exit 2
  fi
}

sub="${1:-help}"
shift || true
case "$sub" in
  create)
    if (( NUM_SLICES > 1 )); then
      echo "multi-slice needs a queued resource: NUM_SLICES=$NUM_SLICES $0 queue" >&2; exit 2
    fi
    extra=()
    if [[ "$SPOT" == 1 ]]; then extra+=(--spot); fi
    run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
      --accelerator-type="$GCLOUD_ACCEL" --version="$RUNTIME" "${extra[@]}"
    ;;
  queue)
    extra=()
    if [[ "$SPOT" == 1 ]]; then extra+=(--spot); fi
    if (( NUM_SLICES > 1 )); then
      extra+=(--node-count="$NUM_SLICES" --node-prefix="$TPU_NAME")
    else
      extra+=(--node-id="$TPU_NAME")
    fi
    run gcloud compute tpus queued-resources create "${TPU_NAME}-qr" --zone="$ZONE" \
      "${PROJECT_FLAG[@]}" --accelerator-type="$GCLOUD_ACCEL" --runtime-version="$RUNTIME" \
      "${extra[@]}"
    echo "queued; watch with: $0 status (state ACTIVE = ready)"
    ;;
  status)
    run gcloud compute tpus queued-resources describe "${TPU_NAME}-qr" --zone="$ZONE" \
      "${PROJECT_FLAG[@]}" || run gcloud compute tpus tpu-vm describe "$TPU_NAME" \
      --zone="$ZONE" "${PROJECT_FLAG[@]}"
    ;;
  install)
    need_repo
    on_all_hosts "set -e; if [ ! -d $REMOTE_DIR ]; then git clone $REPO_URL $REMOTE_DIR; fi; \
cd $REMOTE_DIR && git fetch -q origin && git checkout -q $REF && { git pull -q --ff-only || true; }; \
python3 -m venv \$HOME/kimi_vl_venv && \$HOME/kimi_vl_venv/bin/pip install -q -U pip && \
\$HOME/kimi_vl_venv/bin/pip install -q -e '.[tpu]' && \
\$HOME/kimi_vl_venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_devices())'"
    ;;
  run)
    args="$*"
    if [[ -z "$args" ]]; then args="--config=configs/joint_sft.py --workdir=$WORKDIR"; fi
    on_all_hosts "set -o pipefail; cd $REMOTE_DIR && \$HOME/kimi_vl_venv/bin/python -m kimi_vl_jax.main $args \
2>&1 | tee \$HOME/kimi_vl_run.log"
    ;;
  aot)
    # Planning needs no TPU; it runs on host 0 of the first slice (or use a CPU machine).
    node="$(nodes | head -1)"
    run gcloud compute tpus tpu-vm ssh "$node" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=0 \
      --command="cd $REMOTE_DIR && JAX_PLATFORMS=cpu \$HOME/kimi_vl_venv/bin/python -m kimi_vl_jax.aot $*"
    ;;
  ssh)
    on_all_hosts "$*"
    ;;
  delete)
    run gcloud compute tpus queued-resources delete "${TPU_NAME}-qr" --zone="$ZONE" \
      "${PROJECT_FLAG[@]}" --force --quiet 2>/dev/null || \
      run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --quiet
    ;;
  help|-h|--help)
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    ;;
  *)
    echo "unknown subcommand '$sub'; see: $0 help" >&2; exit 2
    ;;
esac
