#!/usr/bin/env bash
# Runs one `mixflow` command on every worker of a Cloud TPU VM slice, end to end: creates
# the slice, copies this checkout to every worker, installs it with the TPU build of the
# pinned jax, runs the command on all workers with --distributed (jax.distributed finds
# the slice's workers itself) streaming their logs here, and deletes the slice.
#
#   launch/tpu_pod.sh --name=mixflow-xl2 --zone=us-west4-a --type=v5litepod-16 \
#       [--version=v2-alpha-tpuv5-lite] [--project=P] [--spot] [--keep] [--dry-run] \
#       -- train --config=configs/imagenet_sit.py:sit_xl2 --workdir=gs://BUCKET/run \
#          --config.train.init_from=gs://BUCKET/ckpt/sit_xl2 --config.data.path=...
#
# --dry-run prints the exact commands instead of running them. --keep leaves the slice up
# (rerun with the same --name to reuse it: creation is skipped when it exists). With
# --spot the slice can be preempted: the run saves its step on SIGTERM (exit 143); rerun
# this script with the same workdir to resume.
set -euo pipefail

name="" zone="" type="" version="v2-alpha-tpuv5-lite" project="" spot=0 keep=0 dry_run=0
jax_version="0.10.2"
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --type=*) type="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --spot) spot=1 ;;
    --keep) keep=1 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown argument $1 (the mixflow command goes after --)" >&2
       usage 2 ;;
  esac
  shift
done
mixflow_args=("$@")
for field in name zone type; do
  if [[ -z "${!field}" ]]; then
    echo "tpu_pod.sh: --$field is required." >&2; usage 2
  fi
done
if [[ ${#mixflow_args[@]} -eq 0 ]]; then
  echo "tpu_pod.sh: give the mixflow command after --, e.g. -- train --config=..." >&2
  usage 2
fi

repo="$(cd "$(dirname "$0")/.." && pwd)"
tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")

run() {  # prints the command; runs it unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ $dry_run -eq 0 ]]; then "$@"; fi
}

create=("${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$type"
        --version="$version")
[[ $spot -eq 1 ]] && create+=(--spot)
if [[ $dry_run -eq 1 ]] || ! "${tpu[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
  run "${create[@]}"
fi
cleanup() { [[ $keep -eq 1 ]] || run "${tpu[@]}" delete "$name" "${where[@]}" --quiet; }
trap cleanup EXIT

# The checkout, without its git history and build outputs, to every worker.
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="mkdir -p ~/mixflow_jax"
run "${tpu[@]}" scp --recurse --worker=all "${where[@]}" \
    "$repo/mixflow_jax" "$repo/configs" "$repo/pyproject.toml" "$repo/README.md" \
    "$name:~/mixflow_jax/"
install="cd ~/mixflow_jax && python3 -m pip install -q -e . 'jax[tpu]==$jax_version' \
-f https://storage.googleapis.com/jax-releases/libtpu_releases.html \
&& python3 -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0])'"
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$install"
command="cd ~/mixflow_jax && python3 -m mixflow_jax $(printf '%q ' "${mixflow_args[@]}")--distributed"
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$command"
