#!/bin/sh
# A one-node Slurm cluster on this machine, for the tests and for trying the pool manager by hand.
#
#   tools/slurm-single-node.sh [start]   start munged, slurmctld and slurmd (or reuse them) and
#                                        wait until the node is idle
#   tools/slurm-single-node.sh stop      stop what `start` started
#   tools/slurm-single-node.sh status    exit 0 when the node answers
#
# It installs nothing: Debian's slurm-wlm and munge must be there (apt-get install slurm-wlm
# munge). It runs as root, without systemd: munged as the munge user, slurmctld and slurmd as
# root in the foreground (-D) in the background. The node is this host (hostname -s) at
# 127.0.0.1, with its real CPUs and memory (slurmd -C); jobs may share CPUs (OverSubscribe) so
# that more pilots than cores can run; process tracking by process group, no cgroups, no
# accounting (so no sacct: jobs are tracked with squeue). It writes /etc/slurm/slurm.conf only
# if there is none or the one there is its own, and never touches another cluster's.
set -eu

CONF=/etc/slurm/slurm.conf
MARK='# written by p3s tools/slurm-single-node.sh'
RUN=/run/p3s-slurm
LOGS=/var/log/slurm
READY_TIMEOUT=${SLURM_READY_TIMEOUT:-60}

say() { echo "slurm-single-node: $*" >&2; }
die() { say "error: $*"; exit 1; }

node_state() {
    sinfo -h -o %t 2>/dev/null | head -n 1
}

is_ready() {
    case "$(node_state)" in
        idle*|mix*|alloc*) return 0 ;;
    esac
    return 1
}

write_conf() {
    if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script: not touching another cluster"
    fi
    host=$(hostname -s)
    # slurmd -C prints this node's line (CPUs, sockets, cores, memory); its own name is replaced
    # by the address-qualified one.
    node=$(slurmd -C | head -n 1 | sed "s/^NodeName=[^ ]*/NodeName=$host NodeAddr=127.0.0.1/")
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOGS"
    cat > "$CONF" <<EOF
$MARK
ClusterName=p3s
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
EOF
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.5
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

start_daemon() {  # name
    if [ -s "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; then
        return
    fi
    setsid "$(command -v "$1")" -D >>"$LOGS/$1.out" 2>&1 </dev/null &
    echo $! > "$RUN/$1.started"
}

start() {
    [ "$(id -u)" = 0 ] || die "must run as root (the daemons of a cluster do)"
    for daemon in slurmctld slurmd munged; do
        command -v "$daemon" >/dev/null || die "$daemon not found: apt-get install slurm-wlm munge"
    done
    if is_ready; then
        say "reusing the running cluster (node $(node_state))"
        return
    fi
    mkdir -p "$RUN"
    write_conf
    start_munge
    start_daemon slurmctld
    start_daemon slurmd
    waited=0
    while ! is_ready; do
        if [ "$waited" -ge "$((READY_TIMEOUT * 2))" ]; then
            die "the node is not idle after ${READY_TIMEOUT} s (state '$(node_state)'; see $LOGS)"
        fi
        # A node that came back from a crash may be down: tell the controller it is fine.
        case "$(node_state)" in
            down*|drain*)
                scontrol update NodeName="$(hostname -s)" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.5
        waited=$((waited + 1))
    done
    say "node $(hostname -s) is $(node_state)"
}

stop() {
    for daemon in slurmd slurmctld; do
        for file in "$RUN/$daemon.pid" "$RUN/$daemon.started"; do
            if [ -s "$file" ]; then
                kill "$(cat "$file")" 2>/dev/null || true
            fi
        done
        rm -f "$RUN/$daemon.started"
    done
    say "stopped slurmd and slurmctld (munged keeps running)"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) is_ready ;;
    *) die "usage: $0 [start|stop|status]" ;;
esac
