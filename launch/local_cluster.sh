#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine, for the launcher's tests and for trying
# `moe launch` on a laptop.
#
#   launch/local_cluster.sh up       install slurm-wlm + munge when missing (Debian/Ubuntu, root),
#                                    write the config and start munged, slurmctld and two slurmd
#                                    (node1, node2); idempotent: a running cluster is left as is
#   launch/local_cluster.sh down     stop the daemons (the config and state stay)
#   launch/local_cluster.sh status   sinfo and squeue
#   launch/local_cluster.sh env      print `export SLURM_CONF=...`: eval "$(launch/local_cluster.sh env)"
#
# Everything lives in $MOE_SLURM_DIR (default /tmp/moe-slurm): slurm.conf, the munge key and socket,
# state, spool and logs. Nothing in /etc is written; Slurm's commands find the cluster through
# SLURM_CONF. Both "nodes" are this machine: they are slurmd daemons started with `-N node1` and
# `-N node2`, listening on distinct ports of 127.0.0.1. Ports: $MOE_SLURM_PORT (default 6817) for
# slurmctld, the next two for the nodes.
set -euo pipefail

DIR=${MOE_SLURM_DIR:-/tmp/moe-slurm}
PORT=${MOE_SLURM_PORT:-6817}
CONF=$DIR/slurm.conf
NODES=(node1 node2)
export SLURM_CONF=$CONF

log() { echo "[local_cluster] $*" >&2; }
die() { log "error: $*"; exit 1; }

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null && return 0
    [[ $(id -u) == 0 ]] || die "slurm-wlm and munge are not installed; as root run: apt-get install -y slurm-wlm munge"
    command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and apt-get is not available"
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null || die "apt-get install slurm-wlm munge failed"
}

write_config() {
    mkdir -p "$DIR"/{munge,state,run,log,spool/node1,spool/node2}
    chmod 700 "$DIR/munge"
    if [[ ! -s $DIR/munge/munge.key ]]; then
        head -c 1024 /dev/urandom > "$DIR/munge/munge.key"
    fi
    chmod 400 "$DIR/munge/munge.key"
    local cpus mem_mb host
    cpus=$(nproc)
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 4 ))  # each node: a quarter of RAM
    host=$(hostname -s)
    cat > "$CONF.tmp" <<EOF
# Written by launch/local_cluster.sh: two slurmd "nodes" on this machine.
ClusterName=moelocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# containers: no cgroups needed
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=120
MailProg=/bin/true
NodeName=node1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 1)) CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
NodeName=node2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 2)) CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
    mv "$CONF.tmp" "$CONF"
}

cluster_ready() {
    # both nodes answer and are usable (idle, mixed or allocated)
    local states
    states=$(timeout 10 sinfo -h -N -o "%N %t" 2>/dev/null) || return 1
    for n in "${NODES[@]}"; do
        grep -Eq "^$n (idle|mix|alloc)" <<<"$states" || return 1
    done
}

up() {
    install_packages
    if pid_alive "$DIR/run/munged.pid" && pid_alive "$DIR/run/slurmctld.pid" \
        && pid_alive "$DIR/run/slurmd-node1.pid" && pid_alive "$DIR/run/slurmd-node2.pid" && cluster_ready; then
        log "already up (SLURM_CONF=$CONF)"
        return 0
    fi
    write_config
    if ! pid_alive "$DIR/run/munged.pid"; then
        munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
            --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
            --seed-file="$DIR/munge/munged.seed" 2>>"$DIR/log/munged.log" \
            || die "munged failed to start; see $DIR/log/munged.log"
    fi
    if ! pid_alive "$DIR/run/slurmctld.pid"; then
        # -c: a fresh controller state; jobs of an earlier cluster (e.g. killed mid-run) are not rerun
        slurmctld -c -f "$CONF" || die "slurmctld failed to start; see $DIR/log/slurmctld.log"
    fi
    for n in "${NODES[@]}"; do
        if ! pid_alive "$DIR/run/slurmd-$n.pid"; then
            slurmd -f "$CONF" -N "$n" || die "slurmd -N $n failed to start; see $DIR/log/slurmd-$n.log"
        fi
    done
    for _ in $(seq 1 60); do
        if cluster_ready; then
            # a node left DOWN by an earlier unclean stop comes back here
            log "up: $(sinfo -h -o '%P %D nodes %t' | head -n1) (SLURM_CONF=$CONF)"
            return 0
        fi
        for n in "${NODES[@]}"; do
            if sinfo -h -N -n "$n" -o "%t" 2>/dev/null | grep -Eq "down|drain|drng|fail"; then
                scontrol update NodeName="$n" State=RESUME 2>/dev/null || true
            fi
        done
        sleep 0.5
    done
    sinfo -N -l >&2 || true
    die "the nodes did not become ready in 30 s; logs in $DIR/log"
}

stop_pid() {
    local f=$1
    if pid_alive "$f"; then
        local pid
        pid=$(cat "$f")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

down() {
    [[ -d $DIR ]] || { log "not set up ($DIR does not exist)"; return 0; }
    for n in "${NODES[@]}"; do stop_pid "$DIR/run/slurmd-$n.pid"; done
    stop_pid "$DIR/run/slurmctld.pid"
    stop_pid "$DIR/run/munged.pid"
    log "down"
}

status() {
    if ! command -v sinfo >/dev/null; then log "slurm is not installed"; return 1; fi
    if ! [[ -f $CONF ]]; then log "not set up: run $0 up"; return 1; fi
    echo "SLURM_CONF=$CONF"
    sinfo || return 1
    squeue || true
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
