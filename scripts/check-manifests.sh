#!/usr/bin/env bash
# Check everything an operator applies from docker/ and k3s/ with the real tools:
#
#   render      every overlay under k3s/overlays/ with kustomize (kubectl's built-in kustomize)
#   validate    kubernetes-validate --strict on each rendered overlay, for the oldest and the
#               newest Kubernetes versions the project supports (K8S_VERSIONS below)
#   checkov     the rendered manifests and docker/Dockerfile; every skip carries its reason
#               next to it (checkov.io/skipN annotations, `# checkov:skip=` comments)
#   hadolint    docker/Dockerfile
#   promtool    check config (k3s/prometheus/prometheus.yml, and scrape-kubernetes.yml with its
#               discovery block swapped for file discovery: Debian's Prometheus is built without
#               Kubernetes discovery), check rules, test rules
#   yamllint    k3s/ (settings in k3s/.yamllint.yml)
#
# Usage: scripts/check-manifests.sh [STEP...]   (default: all steps, in that order)
# Tools: Debian's prometheus (promtool) and kubectl from the machine; checkov, kubernetes-validate,
# yamllint and hadolint at pinned versions in build/tools-venv (scripts/requirements-tools.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

# The Kubernetes versions the manifests are claimed to work on (K3s follows upstream minor
# versions). Both ends are validated; docs/deploy-k3s.md states the same range.
K8S_VERSIONS=(1.30.0 1.37.0)

TOOLS="${TOOLS_VENV:-$REPO/build/tools-venv}"
OUT="$REPO/build/manifests"
HOST_PYTHON="${HOST_PYTHON:-python3}"

log() { printf '[check-manifests %s] %s\n' "$(date +%T)" "$*" >&2; }

step_tools() {
    local stamp="$TOOLS/.requirements" want
    want="$(sha256sum scripts/requirements-tools.txt | cut -d' ' -f1)"
    if [ ! -x "$TOOLS/bin/checkov" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        log "installing tools into $TOOLS"
        rm -rf "$TOOLS"
        "$HOST_PYTHON" -m venv "$TOOLS"
        "$TOOLS/bin/pip" install --quiet --disable-pip-version-check \
            -r scripts/requirements-tools.txt \
            2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
        echo "$want" > "$stamp"
    fi
    if ! command -v promtool >/dev/null 2>&1; then
        log "installing Debian's prometheus (promtool)"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus \
            >/dev/null
    fi
    command -v kubectl >/dev/null 2>&1 || {
        echo "check-manifests: kubectl (for its built-in kustomize) is not installed" >&2; exit 1; }
}

step_render() {
    rm -rf "$OUT"
    mkdir -p "$OUT"
    local dir name
    for dir in k3s/overlays/*/; do
        name="$(basename "$dir")"
        kubectl kustomize "$dir" > "$OUT/$name.yaml"
        log "render: $dir -> build/manifests/$name.yaml ($(grep -c '^kind:' "$OUT/$name.yaml") objects)"
    done
}

step_validate() {
    local v f
    for v in "${K8S_VERSIONS[@]}"; do
        for f in "$OUT"/*.yaml; do
            "$TOOLS/bin/kubernetes-validate" --strict --quiet -k "$v" "$f"
        done
        log "validate: every overlay passes kubernetes-validate --strict for Kubernetes $v"
    done
}

step_checkov() {
    local args=() f
    for f in "$OUT"/*.yaml; do args+=(-f "$f"); done
    "$TOOLS/bin/checkov" --quiet --compact --skip-download --framework kubernetes "${args[@]}"
    "$TOOLS/bin/checkov" --quiet --compact --skip-download --framework dockerfile \
        -f docker/Dockerfile
    log "checkov: no failed checks; every skip has its reason in the manifest or Dockerfile"
}

step_hadolint() {
    "$TOOLS/bin/hadolint" docker/Dockerfile
    log "hadolint: docker/Dockerfile clean"
}

step_promtool() {
    local tmp
    tmp="$(mktemp -d)"
    promtool check config k3s/prometheus/prometheus.yml
    # The Kubernetes job with `kubernetes_sd_configs` replaced by an empty file discovery, every
    # other field as it is; the relabelling is exercised by tests/test_prometheus_scrape.py.
    "$TOOLS/bin/python" - k3s/prometheus/scrape-kubernetes.yml "$tmp/kubernetes-job.yml" <<'EOF'
import sys
import yaml
doc = yaml.safe_load(open(sys.argv[1]))
for job in doc["scrape_configs"]:
    assert job.pop("kubernetes_sd_configs"), job["job_name"]
    job["file_sd_configs"] = [{"files": ["/nonexistent/*.yml"]}]
yaml.safe_dump(doc, open(sys.argv[2], "w"), sort_keys=False)
EOF
    promtool check config "$tmp/kubernetes-job.yml"
    promtool check rules k3s/prometheus/rules/*.yml
    promtool test rules k3s/prometheus/tests/*.yml
    rm -rf "$tmp"
    log "promtool: config, rules and rule tests pass"
}

step_yamllint() {
    "$TOOLS/bin/yamllint" --strict -c k3s/.yamllint.yml k3s
    log "yamllint: k3s/ clean"
}

steps=("$@")
[ "${#steps[@]}" -gt 0 ] || steps=(tools render validate checkov hadolint promtool yamllint)
for s in "${steps[@]}"; do
    case "$s" in
        tools|render|validate|checkov|hadolint|promtool|yamllint)
            t0=$SECONDS
            "step_$s"
            log "$s: $((SECONDS - t0)) s" ;;
        *) echo "usage: scripts/check-manifests.sh [tools|render|validate|checkov|hadolint|promtool|yamllint]..." >&2
           exit 2 ;;
    esac
done
