# Sourced by the image scripts. The podman configuration for machines like the CI
# one (a VM with cgroup v1 and a hard RLIMIT_NPROC): runc (crun refuses cgroup v1
# "hybrid mode"), cgroupfs (no systemd), and no default ulimits (podman's defaults
# exceed the hard limits there: "setrlimit RLIMIT_NPROC: Operation not permitted").
# Elsewhere CONTAINERS_CONF can be left to the system's own.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"
