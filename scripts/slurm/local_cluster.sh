#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (munge + slurmctld + slurmd from Debian's packages, no systemd
# needed), for the tests in tests/test_slurm.py and for trying scripts/slurm/ out before a real cluster.
#
#   scripts/slurm/local_cluster.sh setup      # install if missing, configure, start, wait until the node is idle
#   scripts/slurm/local_cluster.sh status     # daemons, sinfo, squeue; exit 0 only when the node takes jobs
#   scripts/slurm/local_cluster.sh teardown   # cancel jobs, stop the three daemons (packages, config, state stay)
#
# setup is idempotent: with everything up it only checks; with a changed config it restarts the daemons.
# Needs root and apt-get (Debian/Ubuntu). It never touches a slurm.conf it did not write.
# Exit codes: 0 done; 1 failed (the message says why); 2 usage; 3 cannot run here (not root, no apt-get,
# packages not installable, a foreign slurm.conf).
#
# Settings (environment): LOCAL_SLURM_PARTITION (debug), LOCAL_SLURM_KILL_WAIT (30: seconds between SIGTERM
# and SIGKILL when a job ends early), LOCAL_SLURM_REQUEUE_HOLD (10: seconds a requeued job waits before it
# may start again; SLURM's default is 120, via AuthInfo=cred_expire).
set -euo pipefail

PARTITION=${LOCAL_SLURM_PARTITION:-debug}
KILL_WAIT=${LOCAL_SLURM_KILL_WAIT:-30}
REQUEUE_HOLD=${LOCAL_SLURM_REQUEUE_HOLD:-10}

CONF=/etc/slurm/slurm.conf
MARKER="# written by tidpo scripts/slurm/local_cluster.sh"
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
CTLD_PIDFILE=/run/slurmctld.pid
SLURMD_PIDFILE=/run/slurmd.pid
MUNGE_RUN=/run/munge
MUNGE_PIDFILE=$MUNGE_RUN/munged.pid
MUNGE_KEY=/etc/munge/munge.key
APT_LOG=/tmp/tidpo-local-slurm-apt.log

say() { echo "local_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }
cannot() { say "cannot set up a local SLURM cluster here: $*"; exit 3; }

node_name() { hostname -s 2>/dev/null || hostname; }

# alive PID: the process exists and is not a zombie waiting to be reaped
alive() { [ -r "/proc/$1/stat" ] && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$1/stat" 2>/dev/null; }

# running PIDFILE NAME: the pid in PIDFILE is alive and is NAME (so a stale pid file never makes us signal
# an unrelated process)
running() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

# stop PIDFILE NAME: SIGTERM, up to 20 s for it to exit, then SIGKILL
stop() {
  local pidfile=$1 name=$2 pid i
  if ! running "$pidfile" "$name"; then rm -f "$pidfile"; return 0; fi
  pid=$(cat "$pidfile")
  say "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 100); do alive "$pid" || break; sleep 0.2; done
  if alive "$pid"; then say "$name (pid $pid) ignored SIGTERM: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; sleep 0.5; fi
  rm -f "$pidfile"
}

have_binaries() {
  local b
  for b in slurmctld slurmd munged munge sinfo sbatch scontrol; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || return 1
  done
}

install_packages() {
  have_binaries && return 0
  command -v apt-get >/dev/null 2>&1 || cannot "SLURM is not installed and there is no apt-get to install it (Debian/Ubuntu only)"
  say "installing slurm-wlm and munge with apt-get (log: $APT_LOG)"
  # The packages' postinst cannot start services without an init system ("policy-rc.d denied execution"):
  # harmless, this script starts the daemons itself.
  local apt=(apt-get -q -y -o DPkg::Lock::Timeout=120 install slurm-wlm munge)
  if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" >"$APT_LOG" 2>&1; then
    say "apt-get install failed; running apt-get update and trying again"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=120 update \
           && DEBIAN_FRONTEND=noninteractive "${apt[@]}"; } >>"$APT_LOG" 2>&1; then
      tail -n 15 "$APT_LOG" >&2
      cannot "apt-get could not install slurm-wlm and munge (see $APT_LOG)"
    fi
  fi
  have_binaries || cannot "slurm-wlm and munge installed, but slurmctld/slurmd/munged are still missing"
}

start_munge() {
  if [ ! -s "$MUNGE_KEY" ]; then
    say "creating the munge key"
    install -d -o munge -g munge -m 0700 /etc/munge
    if command -v mungekey >/dev/null 2>&1; then mungekey --create --keyfile "$MUNGE_KEY" --force
    else dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none; fi
  fi
  chown munge:munge "$MUNGE_KEY"
  chmod 0600 "$MUNGE_KEY"
  # systemd would create /run/munge (RuntimeDirectory=munge); without it nobody does.
  install -d -o munge -g munge -m 0755 "$MUNGE_RUN"
  install -d -o munge -g munge -m 0700 /var/log/munge
  install -d -o munge -g munge -m 0711 /var/lib/munge
  if ! running "$MUNGE_PIDFILE" munged; then
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)"
  fi
  munge -n | unmunge >/dev/null 2>&1 || die "munge does not work: 'munge -n | unmunge' failed"
}

# Prints the config this machine should have.
render_conf() {
  local node hw
  node=$(node_name)
  # The node's hardware line as slurmd sees it, e.g. "CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2
  # ThreadsPerCore=1 RealMemory=24105". A larger RealMemory than this would leave the node drained.
  hw=$(slurmd -C | head -n 1 | sed 's/^NodeName=[^ ]* *//')
  [ -n "$hw" ] || die "'slurmd -C' printed nothing"
  cat <<EOF
$MARKER: setup rewrites it, teardown leaves it.
ClusterName=local
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire + 1 s before it may start again (SLURM's default: 120 s).
AuthInfo=cred_expire=${REQUEUE_HOLD}
# The scheduler looks at pending jobs every 5 s (default 60 s), so a requeued job restarts soon after the hold.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait=${KILL_WAIT}
StateSaveLocation=${STATE_DIR}
SlurmdSpoolDir=${SPOOL_DIR}
SlurmctldPidFile=${CTLD_PIDFILE}
SlurmdPidFile=${SLURMD_PIDFILE}
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=${node} NodeAddr=127.0.0.1 ${hw} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${node} Default=YES MaxTime=INFINITE State=UP
EOF
}

ours() { [ -f "$CONF" ] && head -n 1 "$CONF" | grep -qF "$MARKER"; }

# Writes the config; returns 0 when it changed.
write_conf() {
  local new
  if [ -f "$CONF" ] && ! ours; then
    cannot "$CONF exists and was not written by this script (a real SLURM node?); not touching it"
  fi
  new=$(mktemp)
  render_conf >"$new"
  if [ -f "$CONF" ] && cmp -s "$new" "$CONF"; then rm -f "$new"; return 1; fi
  install -d -m 0755 "$(dirname "$CONF")"
  install -m 0644 "$new" "$CONF"
  rm -f "$new"
  say "wrote $CONF"
  return 0
}

node_state() { sinfo -h -n "$(node_name)" -o %t 2>/dev/null | head -n 1 || true; }

wait_until_idle() {
  local i state=""
  for i in $(seq 120); do
    state=$(node_state)
    case "$state" in
      idle*|mix*|alloc*|comp*) return 0 ;;
      down*|drain*|drng*|fail*)
        # e.g. left down by an unclean stop recorded in the saved state
        if [ "$i" -gt 4 ]; then scontrol update nodename="$(node_name)" state=resume >/dev/null 2>&1 || true; fi ;;
    esac
    sleep 0.25
  done
  sinfo -R >&2 || true
  tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 2>/dev/null || true
  die "the node did not become idle within 30 s (state: '${state:-unknown}')"
}

setup() {
  [ "$(id -u)" = 0 ] || cannot "it needs root (to install packages and run slurmctld/slurmd); run it with sudo"
  if [ -f "$CONF" ] && ! ours; then
    cannot "$CONF exists and was not written by this script (a real SLURM node?); not touching it"
  fi
  install_packages
  start_munge
  if write_conf && { running "$CTLD_PIDFILE" slurmctld || running "$SLURMD_PIDFILE" slurmd; }; then
    say "the config changed: restarting slurmd and slurmctld"
    stop "$SLURMD_PIDFILE" slurmd
    stop "$CTLD_PIDFILE" slurmctld
  fi
  install -d -o slurm -g slurm -m 0755 "$STATE_DIR" "$LOG_DIR"
  install -d -m 0755 "$SPOOL_DIR"
  if ! running "$CTLD_PIDFILE" slurmctld; then
    say "starting slurmctld"
    /usr/sbin/slurmctld || die "slurmctld did not start (see $LOG_DIR/slurmctld.log)"
  fi
  if ! running "$SLURMD_PIDFILE" slurmd; then
    say "starting slurmd"
    /usr/sbin/slurmd || die "slurmd did not start (see $LOG_DIR/slurmd.log)"
  fi
  wait_until_idle
  say "up: partition $PARTITION, node $(node_name) ($(sinfo -h -o '%c CPUs' | head -n 1)), requeue hold ${REQUEUE_HOLD} s"
}

status() {
  local ok=0
  local pidfile name
  for pidfile in "$MUNGE_PIDFILE:munged" "$CTLD_PIDFILE:slurmctld" "$SLURMD_PIDFILE:slurmd"; do
    name=${pidfile##*:}
    pidfile=${pidfile%:*}
    if running "$pidfile" "$name"; then printf '%-10s running (pid %s)\n' "$name" "$(cat "$pidfile")"
    else printf '%-10s not running\n' "$name"; ok=1
    fi
  done
  if [ "$ok" = 0 ]; then
    sinfo || true
    squeue || true
    case "$(node_state)" in idle*|mix*|alloc*|comp*) ;; *) ok=1 ;; esac
  fi
  return "$ok"
}

teardown() {
  [ "$(id -u)" = 0 ] || cannot "it needs root"
  if [ -f "$CONF" ] && ! ours; then cannot "$CONF was not written by this script; not stopping anything"; fi
  if running "$CTLD_PIDFILE" slurmctld; then
    local jobs i
    jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ' || true)
    if [ -n "${jobs// /}" ]; then
      say "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      # slurmstepd outlives slurmd: let the jobs end before the daemons go
      for i in $(seq $((KILL_WAIT * 4 + 40))); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.25; done
    fi
  fi
  stop "$SLURMD_PIDFILE" slurmd
  stop "$CTLD_PIDFILE" slurmctld
  stop "$MUNGE_PIDFILE" munged
  say "stopped"
}

case "${1:-}" in
  setup) setup ;;
  status) status ;;
  teardown) teardown ;;
  *) echo "usage: $0 setup|status|teardown" >&2; exit 2 ;;
esac
