#!/usr/bin/env bash
# Starts a real one-node Slurm cluster on this machine (munged, slurmctld, slurmd on localhost),
# for the scale-out tests. Installs Debian's packages when they are missing. Run as root.
#   bash tests/slurm/start.sh        # then: sinfo -> debug* up infinite 1 idle localhost
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

if [ ! -x /usr/sbin/slurmctld ] || [ ! -x /usr/sbin/slurmd ] || [ ! -x /usr/sbin/munged ] \
    || ! command -v sbatch >/dev/null; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge
fi

# The node's CPUs and memory come from this machine: Slurm refuses a node that claims more.
cpus="$(nproc)"
mem_mb="$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))"
mkdir -p /etc/slurm
sed -e "s/@CPUS@/$cpus/" -e "s/@MEMORY@/$mem_mb/" "$here/slurm.conf.in" > /etc/slurm/slurm.conf

mkdir -p /var/spool/slurmctld /var/spool/slurmd /run/munge /var/log
chown munge: /run/munge
[ -f /etc/munge/munge.key ] || { /usr/sbin/mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f; }
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
pgrep -x slurmctld >/dev/null || { /usr/sbin/slurmctld; sleep 2; }
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd

# Up when the node is idle (or mixed/allocated, if jobs are already running).
for _ in $(seq 1 30); do
  state="$(sinfo -h -o '%t' 2>/dev/null | head -n1 || true)"
  case "$state" in idle|mix|alloc) echo "slurm is up: $(sinfo -h)"; exit 0 ;; esac
  sleep 1
done
echo "slurm did not come up; node state '${state:-none}'" >&2
tail -n 20 /var/log/slurmctld.log /var/log/slurmd.log >&2 || true
exit 1
