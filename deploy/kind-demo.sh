#!/usr/bin/env bash
# netpol in KIND, the way the seed tutorial runs Calico: a cluster with the default CNI
# disabled, netpol applied as one manifest, the seed's 3-tier app, then curl/telnet-style
# probes with `kubectl exec` before and after the seed's policies, and again after the seed's
# task (the database moved to its own namespace, db-ns, under the same rules).
#
#   deploy/kind-demo.sh            create (or reuse) the cluster, build, deploy, probe
#   deploy/kind-demo.sh --delete   delete the cluster
#
# Needs docker, kind and kubectl. Prints PASS/FAIL per probe and exits non-zero on any FAIL.
# The probes and their expectations are in deploy/kind/probes.txt.
set -euo pipefail

CLUSTER=netpol
IMAGE=netpol-agent:dev
# Seconds to let the agents program a policy change before probing it.
SETTLE=${NETPOL_SETTLE_SECONDS:-5}

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
die() {
    echo "kind-demo: $*" >&2
    exit 1
}
need() {
    command -v "$1" >/dev/null 2>&1 || die "'$1' is not installed; $2"
}
# kubectl against this cluster, whatever the current context is.
k() { kubectl --context "kind-$CLUSTER" "$@"; }

usage() {
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
}

case "${1:-}" in
    "") ;;
    --delete)
        need kind "see https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
        kind delete cluster --name "$CLUSTER"
        exit 0
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        usage >&2
        exit 2
        ;;
esac

need docker "see https://docs.docker.com/engine/install/"
need kind "see https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
need kubectl "see https://kubernetes.io/docs/tasks/tools/"
docker info >/dev/null 2>&1 || die "docker is installed but its daemon is not reachable (is it running? may you use it?)"

step "1. cluster '$CLUSTER' (deploy/kind-cluster.yaml: default CNI disabled, 1 control plane + 2 workers)"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    echo "cluster $CLUSTER exists: reusing it"
else
    kind create cluster --name "$CLUSTER" --config deploy/kind-cluster.yaml
fi
# The agent pins its maps and links in the node's bpffs; it cannot mount one itself (no
# CAP_SYS_ADMIN), so the node must have it, as systemd provides on ordinary hosts.
for node in $(kind get nodes --name "$CLUSTER"); do
    docker exec "$node" sh -c \
        'grep -q " /sys/fs/bpf bpf " /proc/mounts || mount -t bpf bpf /sys/fs/bpf'
done
echo "bpffs mounted at /sys/fs/bpf on every node"

step "2. image $IMAGE (deploy/Dockerfile), loaded into the nodes"
DOCKER_BUILDKIT=1 docker build -f deploy/Dockerfile -t "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"

step "3. netpol (deploy/netpol.yaml): the agent DaemonSet is the cluster's CNI"
if k -n netpol-system get daemonset netpol-agent >/dev/null 2>&1; then
    k apply -f deploy/netpol.yaml
    # Same tag, new image: restart the agents so they run what was just loaded.
    k -n netpol-system rollout restart daemonset/netpol-agent
else
    k apply -f deploy/netpol.yaml
fi
k -n netpol-system rollout status daemonset/netpol-agent --timeout=300s
# Nodes turn Ready only once a CNI configuration exists: netpol's.
k wait --for=condition=Ready nodes --all --timeout=300s
k get nodes -o wide
k -n netpol-system get pods -o wide

step "4. the seed's 3-tier app (deploy/kind/app.yaml)"
# Start from a clean slate, so a second run probes the same things.
k delete namespace app1-ns db-ns --ignore-not-found --wait
k -n default delete pod client impostor --ignore-not-found --wait
k apply -f deploy/kind/app.yaml
k -n app1-ns rollout status deployment/frontend --timeout=300s
k -n app1-ns rollout status deployment/backend --timeout=300s
k -n app1-ns rollout status statefulset/db-sts --timeout=300s
k -n default wait --for=condition=Ready pod/client --timeout=300s
k -n app1-ns get pods -o wide

passed=0
failed=0
# Runs the probes of one phase from deploy/kind/probes.txt and prints PASS/FAIL for each.
probe_phase() {
    local phase=$1 p want from container cmd ns target got
    # TO and PORT are for the offline check (tests/tests/manifests.rs); the command names them.
    while read -r -u 3 p want from container _ _ cmd; do
        [[ -z $p || $p == \#* || $p != "$phase" ]] && continue
        ns=${from%%/*}
        target=${from#*/}
        # A probe that cannot even start would look like "denied": make sure it can.
        if ! k -n "$ns" exec "$target" -c "$container" -- true </dev/null >/dev/null 2>&1; then
            got="no exec"
        elif k -n "$ns" exec "$target" -c "$container" -- \
            sh -c "timeout 6 $cmd </dev/null" </dev/null >/dev/null 2>&1; then
            got=allowed
        else
            got=denied
        fi
        if [[ $got == "$want" ]]; then
            passed=$((passed + 1))
            printf '  \033[32mPASS\033[0m'
        else
            failed=$((failed + 1))
            printf '  \033[31mFAIL\033[0m'
        fi
        printf '  %-17s %-7s  expected %-7s  $ %s\n' "$ns/${target#*/}" "$got" "$want" "$cmd"
    done 3<deploy/kind/probes.txt
}

step "5. probes before any policy: everything connects"
probe_phase before

step "6. the seed's policies (deploy/examples/*.yaml)"
k apply -f deploy/examples/
sleep "$SETTLE"
probe_phase after

step "7. the seed's task: the database moves to namespace db-ns, same rules"
k -n app1-ns delete statefulset/db-sts service/db-svc networkpolicy/db-policy --ignore-not-found --wait
k apply -f deploy/kind/app-db-ns.yaml
k -n db-ns rollout status statefulset/db-sts --timeout=300s
k -n default wait --for=condition=Ready pod/impostor --timeout=300s
k apply -f deploy/kind/policies-db-ns/
sleep "$SETTLE"
probe_phase db-ns

step "8. what netpol programmed for the backend (netpol-agent dump on its node)"
backend=$(k -n app1-ns get pod -l role=backend -o jsonpath='{.items[0].metadata.name}')
node=$(k -n app1-ns get pod "$backend" -o jsonpath='{.spec.nodeName}')
agent=$(k -n netpol-system get pod -l app.kubernetes.io/name=netpol-agent \
    --field-selector "spec.nodeName=$node" -o name)
k -n netpol-system exec "$agent" -- netpol-agent dump --pod "app1-ns/$backend" ||
    echo "(dump failed; see: kubectl --context kind-$CLUSTER -n netpol-system logs $agent)"

step "summary"
echo "$((passed + failed)) probes: $passed PASS, $failed FAIL"
echo "inspect: kubectl --context kind-$CLUSTER -n netpol-system exec ds/netpol-agent -- netpol-agent dump"
echo "delete:  deploy/kind-demo.sh --delete"
[[ $failed -eq 0 ]]
