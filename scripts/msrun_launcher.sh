#!/usr/bin/env bash
# Launch a command on MindSpore workers with msrun, in MindFormers' positional forms:
#   msrun_launcher.sh "CMD"
#   msrun_launcher.sh "CMD" WORKER_NUM
#   msrun_launcher.sh "CMD" WORKER_NUM MASTER_PORT LOG_DIR JOIN CLUSTER_TIME_OUT
#   msrun_launcher.sh "CMD" WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK LOG_DIR JOIN CLUSTER_TIME_OUT
# CMD is a python script and its arguments ("run_mindformer.py --config ..."); msrun runs it with python.
# Defaults: 8 workers, all local, master 127.0.0.1:8118, node rank 0, log dir output/msrun_log,
# join False (return at once), cluster timeout 7200 s.
set -u

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 1
}

fail() {
  echo "msrun_launcher.sh: $1" >&2
  exit 1
}

is_count() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
is_bool() { [[ "$1" == "True" || "$1" == "False" || "$1" == "true" || "$1" == "false" ]]; }

WORKER_NUM=8
LOCAL_WORKER=""
MASTER_ADDR=127.0.0.1
MASTER_PORT=8118
NODE_RANK=0
LOG_DIR=output/msrun_log
JOIN=False
CLUSTER_TIME_OUT=7200

case $# in
  1) COMMAND=$1 ;;
  2) COMMAND=$1; WORKER_NUM=$2 ;;
  6) COMMAND=$1; WORKER_NUM=$2; MASTER_PORT=$3; LOG_DIR=$4; JOIN=$5; CLUSTER_TIME_OUT=$6 ;;
  9) COMMAND=$1; WORKER_NUM=$2; LOCAL_WORKER=$3; MASTER_ADDR=$4; MASTER_PORT=$5; NODE_RANK=$6
     LOG_DIR=$7; JOIN=$8; CLUSTER_TIME_OUT=$9 ;;
  *) echo "msrun_launcher.sh: expected 1, 2, 6 or 9 arguments, got $#" >&2; usage ;;
esac
LOCAL_WORKER=${LOCAL_WORKER:-$WORKER_NUM}

[[ -n "${COMMAND// }" ]] || fail "the command to run is empty"
is_count "$WORKER_NUM" || fail "WORKER_NUM must be a positive integer, got '$WORKER_NUM'"
is_count "$LOCAL_WORKER" || fail "LOCAL_WORKER must be a positive integer, got '$LOCAL_WORKER'"
(( LOCAL_WORKER <= WORKER_NUM )) || fail "LOCAL_WORKER $LOCAL_WORKER exceeds WORKER_NUM $WORKER_NUM"
[[ "$MASTER_PORT" =~ ^[0-9]+$ ]] && (( MASTER_PORT > 0 && MASTER_PORT < 65536 )) \
  || fail "MASTER_PORT must be a port number (1-65535), got '$MASTER_PORT'"
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] || fail "NODE_RANK must be a non-negative integer, got '$NODE_RANK'"
is_bool "$JOIN" || fail "JOIN must be True or False, got '$JOIN'"
is_count "$CLUSTER_TIME_OUT" || fail "CLUSTER_TIME_OUT must be a positive number of seconds, got '$CLUSTER_TIME_OUT'"
# msrun runs "python CMD": the first word must be a script that exists.
SCRIPT=${COMMAND%% *}
[[ -f "$SCRIPT" ]] || fail "script '$SCRIPT' (first word of the command) does not exist in $(pwd)"
command -v msrun >/dev/null || fail "msrun is not on PATH (activate the environment with MindSpore)"
if (( WORKER_NUM == 1 )); then
  echo "msrun_launcher.sh: note: 1 worker; 'python $COMMAND' does the same without msrun" >&2
fi
case "$JOIN" in true) JOIN=True ;; false) JOIN=False ;; esac
mkdir -p "$LOG_DIR" || fail "cannot create LOG_DIR '$LOG_DIR'"

first=$(( NODE_RANK * LOCAL_WORKER ))
# With JOIN the console follows this node's first worker only (rank 0 is the one that reports);
# every worker's full output stays in its log.
ARGS=(--worker_num="$WORKER_NUM" --local_worker_num="$LOCAL_WORKER" --master_addr="$MASTER_ADDR"
      --master_port="$MASTER_PORT" --node_rank="$NODE_RANK" --log_dir="$LOG_DIR" --join="$JOIN"
      --cluster_time_out="$CLUSTER_TIME_OUT" --tail_worker_log="$first")
echo "msrun ${ARGS[*]} $COMMAND"

# MindSpore's own log lines below ERROR ([INFO] DISTRIBUTED(...), [WARNING] ME(...)) and msrun's
# per-process start lines are for the logs, not the person watching; errors and the run's own
# lines pass.
console_filter() {
  grep --line-buffered -v -E '^\[(DEBUG|INFO|WARNING)\] [A-Z_]+\([0-9]+[,:]|^Start (scheduler|worker) process' || true
}
# The command is word-split on purpose: it is a script with its arguments, as MindFormers' launcher takes it.
# msrun starts a scheduler on every node whose MASTER_ADDR is one of its own addresses; for node
# ranks > 0 on the master's machine (several "nodes" on one host) that second scheduler collides
# with the first, so those workers are started here with the environment msrun would give them.
local_master=$(python - "$MASTER_ADDR" <<'PY' 2>/dev/null
import sys
from mindspore.parallel.cluster.process_entity._utils import _is_local_ip
print(_is_local_ip(sys.argv[1]))
PY
)
if (( NODE_RANK > 0 )) && [[ "$local_master" == "True" ]]; then
  pids=()
  for (( i = 0; i < LOCAL_WORKER; i++ )); do
    rank=$(( NODE_RANK * LOCAL_WORKER + i ))
    # shellcheck disable=SC2086
    MS_WORKER_NUM=$WORKER_NUM MS_SCHED_HOST=$MASTER_ADDR MS_SCHED_PORT=$MASTER_PORT MS_TOPO_TIMEOUT=$CLUSTER_TIME_OUT \
      MS_ROLE=MS_WORKER MS_NODE_ID=$rank RANK_ID=$rank RANK_SIZE=$WORKER_NUM DEVICE_ID=$i \
      python $COMMAND > "$LOG_DIR/worker_$rank.log" 2>&1 &
    pids+=($!)
  done
  status=0
  if [[ "$JOIN" == "True" ]]; then
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  fi
# shellcheck disable=SC2086
elif [[ "$JOIN" == "True" ]]; then
  msrun "${ARGS[@]}" $COMMAND 2>&1 | console_filter
  status=${PIPESTATUS[0]}
else
  msrun "${ARGS[@]}" $COMMAND 2>&1 | console_filter &
  status=0
fi
for (( i = first; i < first + LOCAL_WORKER; i++ )); do
  echo "worker $i log: $LOG_DIR/worker_$i.log"
done
(( NODE_RANK == 0 )) && echo "scheduler log: $LOG_DIR/scheduler.log"
if [[ "$JOIN" == "True" ]]; then
  echo "msrun finished with exit status $status"
else
  echo "running in the background (JOIN False); follow with: tail -f $LOG_DIR/worker_0.log"
fi
exit $status
