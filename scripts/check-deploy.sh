#!/usr/bin/env bash
# check-deploy.sh: what deploy/ ships, checked for real (scripts/test.sh runs it):
# - the Helm chart (deploy/helm/snapreg) lints (`helm lint --strict`, helm from
#   deploy/install-helm.sh) and renders, with its defaults and with TLS
#   (ci/tls-values.yaml), and every rendered object validates against the Kubernetes
#   schemas (kubernetes-validate --strict; ServiceMonitor against its CRD's fields);
# - docs/architecture.svg is exactly what docs/architecture.dot renders to;
# - the systemd units pass `systemd-analyze verify`;
# - the container images build here without pulling anything from a registry
#   (a Debian root made by mmdebstrap) and the registry image serves a push and a
#   pull through podman, then drains on SIGTERM (deploy/images/smoke-test.sh).
# Installs what it needs from Debian's packages and PyPI (pinned). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
readonly K8S_VERSION=1.30.0
readonly KUBERNETES_VALIDATE=1.37.0
readonly YAMLLINT=1.37.1

need_apt=()
for cmd in dot:graphviz mmdebstrap:mmdebstrap podman:podman runc:runc systemd-analyze:systemd; do
    command -v "${cmd%%:*}" >/dev/null || need_apt+=("${cmd#*:}")
done
if ((${#need_apt[@]})); then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}" >&2
fi
pip_have() { [[ "$(pip show "$1" 2>/dev/null | sed -n 's/^Version: //p')" == "$2" ]]; }
pip_have kubernetes-validate "$KUBERNETES_VALIDATE" && pip_have yamllint "$YAMLLINT" \
    || pip install -q "kubernetes-validate==$KUBERNETES_VALIDATE" "yamllint==$YAMLLINT" >&2

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
helm="$(deploy/install-helm.sh | tail -n 1)"
chart=deploy/helm/snapreg
yamllint -d '{extends: relaxed, rules: {line-length: {max: 120}}}' "$chart/values.yaml" "$chart/ci"
for values in "" "$chart/ci/tls-values.yaml"; do
    name="${values:+tls}"
    "$helm" lint --strict "$chart" ${values:+-f "$values"}
    "$helm" template snapreg "$chart" --namespace snapreg ${values:+-f "$values"} \
        >"$out/chart-${name:-default}.yaml"
    python3 scripts/validate-manifests.py "$K8S_VERSION" "$out/chart-${name:-default}.yaml"
done

dot -Tsvg docs/architecture.dot -o "$out/architecture.svg"
if ! cmp -s "$out/architecture.svg" docs/architecture.svg; then
    echo "docs/architecture.svg is stale: run 'dot -Tsvg docs/architecture.dot -o docs/architecture.svg'" >&2
    exit 1
fi
echo "architecture.svg: renders from architecture.dot, up to date"

for unit in deploy/systemd/*.service; do
    # The binaries are not installed on a CI machine: that one complaint is expected.
    problems="$(systemd-analyze verify --man=no "$unit" 2>&1 | grep -v 'is not executable' || true)"
    if [[ -n $problems ]]; then
        echo "$unit: $problems" >&2
        exit 1
    fi
done
echo "systemd units: systemd-analyze verify clean"

images="$(bash deploy/images/build.sh --prebuilt)"
# shellcheck disable=SC2086 # two words: the registry and the node image
bash deploy/images/smoke-test.sh $images
