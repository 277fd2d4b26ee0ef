#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for the `slurm` tests and for trying
# `immuneage slurm submit` without a cluster.
#
#   slurm/localhost.sh up       write /etc/slurm/{slurm,gres}.conf, start munged, slurmctld, slurmd;
#                               wait until the node is idle (already up: prints the state, exit 0)
#   slurm/localhost.sh down     stop the daemons this script started, wipe Slurm's state
#   slurm/localhost.sh status   the daemons' pids and `sinfo`; exit 1 when the cluster is not up
#
# Needs root and Debian's packages (no systemd needed: the daemons are started by hand):
#   apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
# Cluster: one node (this host, its real CPUs and memory from `slurmd -C`), partitions `cpu`
# (default) and `gpu`, a fake `gpu:1` GRES (gres.conf File=/dev/null) so `--gres=gpu:1` is
# really scheduled, no accounting daemon (sacct does not work; scontrol/squeue do), finished
# jobs kept visible to scontrol for an hour (MinJobAge=3600).
# Recipe: ../shared/slurm-localhost.md. Override the config directory with SLURM_LOCALHOST_CONF.
set -euo pipefail

CONF_DIR=${SLURM_LOCALHOST_CONF:-/etc/slurm}
STATE_DIR=/var/lib/slurm
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
MARKER=/run/immuneage-localhost-slurm  # written by `up`: which daemons this script started
WAIT_S=${SLURM_LOCALHOST_WAIT_S:-60}

die() {
    echo "slurm/localhost.sh: error: $*" >&2
    exit 1
}
say() { echo "slurm/localhost.sh: $*"; }

alive() { # alive PIDFILE -> 0 when the pid in the file runs
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

need_root_and_packages() {
    [[ $EUID -eq 0 ]] || die "must run as root (it writes $CONF_DIR and starts daemons)"
    local missing=()
    for b in slurmctld slurmd sinfo sbatch scontrol munged; do
        command -v "$b" >/dev/null 2>&1 || [[ -x /usr/sbin/$b ]] || missing+=("$b")
    done
    if ((${#missing[@]})); then
        die "missing ${missing[*]}; install them with: apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
    fi
}

node_state() { # state of this node in partition cpu, empty when slurmctld does not answer
    SLURM_CONF=$CONF_DIR/slurm.conf timeout 5 sinfo -h -N -p cpu -o %t 2>/dev/null | head -1 || true
}

write_config() {
    local host node
    host=$(hostname -s)
    node=$(/usr/sbin/slurmd -C | head -1)
    [[ $node == NodeName=* ]] || die "slurmd -C did not describe this node: $node"
    install -d -m 755 "$CONF_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd" "$LOG_DIR"
    cat >"$CONF_DIR/slurm.conf" <<EOF
# Written by immuneage slurm/localhost.sh: a single-node test cluster.
ClusterName=immuneage-localhost
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
MinJobAge=3600
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=60
$node NodeAddr=127.0.0.1 Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$host MaxTime=INFINITE State=UP
EOF
    cat >"$CONF_DIR/gres.conf" <<EOF
# Written by immuneage slurm/localhost.sh: a fake GPU so --gres=gpu:1 is scheduled.
NodeName=$host Name=gpu File=/dev/null
EOF
}

cmd_up() {
    need_root_and_packages
    local state
    state=$(node_state)
    if [[ $state == idle* || $state == mix* || $state == alloc* ]]; then
        say "already up (node $state)"
        SLURM_CONF=$CONF_DIR/slurm.conf sinfo
        return 0
    fi
    # leftovers of a half-started cluster: stop them, start clean
    if alive "$CTLD_PID" || alive "$SLURMD_PID"; then
        say "daemons run but the node is '${state:-not answering}': restarting them"
        stop_slurm
    fi
    write_config
    : >"$MARKER"
    if ! alive "$MUNGE_PID"; then
        install -d -o munge -g munge -m 755 /run/munge
        [[ -s /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing; reinstall munge or run mungekey"
        runuser -u munge -- /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)"
        echo munged >>"$MARKER"
    fi
    /usr/sbin/slurmctld -c -f "$CONF_DIR/slurm.conf" || die "slurmctld did not start (see $LOG_DIR/slurmctld.log)"
    echo slurmctld >>"$MARKER"
    /usr/sbin/slurmd -f "$CONF_DIR/slurm.conf" || die "slurmd did not start (see $LOG_DIR/slurmd.log)"
    echo slurmd >>"$MARKER"
    local t=0
    while ((t < WAIT_S * 2)); do
        state=$(node_state)
        if [[ $state == idle* ]]; then
            say "up: node $(hostname -s) idle, partitions cpu (default) and gpu (gpu:1)"
            SLURM_CONF=$CONF_DIR/slurm.conf sinfo
            return 0
        fi
        sleep 0.5
        t=$((t + 1))
    done
    tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    die "the node is '${state:-not answering}' after ${WAIT_S}s (logs above; $LOG_DIR)"
}

stop_pidfile() { # stop_pidfile NAME PIDFILE
    local pid i
    alive "$2" || return 0
    pid=$(cat "$2")
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || {
            say "stopped $1 (pid $pid)"
            return 0
        }
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    say "killed $1 (pid $pid) after 10 s"
}

stop_slurm() {
    stop_pidfile slurmd "$SLURMD_PID"
    stop_pidfile slurmctld "$CTLD_PID"
}

cmd_down() {
    [[ $EUID -eq 0 ]] || die "must run as root"
    stop_slurm
    if [[ -f $MARKER ]] && grep -qx munged "$MARKER"; then
        stop_pidfile munged "$MUNGE_PID"
    fi
    rm -f "$MARKER"
    # a drained node or stale jobs survive restarts in the state files: wipe them
    rm -rf "${STATE_DIR:?}/slurmctld" "${STATE_DIR:?}/slurmd"
    say "down"
}

cmd_status() {
    local name pidfile ok=0
    for name in munged slurmctld slurmd; do
        case $name in
            munged) pidfile=$MUNGE_PID ;;
            slurmctld) pidfile=$CTLD_PID ;;
            slurmd) pidfile=$SLURMD_PID ;;
        esac
        if alive "$pidfile"; then
            say "$name running (pid $(cat "$pidfile"))"
        else
            say "$name not running"
            ok=1
        fi
    done
    if ! SLURM_CONF=$CONF_DIR/slurm.conf timeout 5 sinfo 2>/dev/null; then
        say "sinfo does not answer"
        ok=1
    fi
    return $ok
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 up|down|status" >&2
        exit 2
        ;;
esac
