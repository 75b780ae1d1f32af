# shellcheck shell=bash
# Sourced by scripts/*: make .venv (Python 3.11+) if it is missing and install the project into it.
# Usage: ensure_venv EXTRAS   (EXTRAS is "" or "[test]")
# PROXY_VENV=/path/to/env: use that environment exactly as it is (the project already installed
# there): nothing is created or installed. The tests set it to the environment they run in, so
# that running scripts/demo from a test never changes the venv under the test.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PROXY_VENV:-$ROOT/.venv}"

find_python() {
    for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3 python; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
           "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"; return 0
        fi
    done
    echo "error: Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2
    return 1
}

installed_since_metadata() {  # installed_since_metadata STAMP: STAMP exists and no metadata file is newer
    [ -f "$1" ] && ! [ "$ROOT/setup.cfg" -nt "$1" ] && ! [ "$ROOT/pyproject.toml" -nt "$1" ]
}

ensure_venv() {
    local extras="${1:-}"
    if [ -n "${PROXY_VENV:-}" ]; then
        if [ ! -x "$VENV/bin/python" ]; then
            echo "error: PROXY_VENV=$PROXY_VENV has no bin/python" >&2
            return 1
        fi
        return 0
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        local python; python="$(find_python)"
        echo "==> creating $VENV with $("$python" --version)"
        "$python" -m venv "$VENV"
    fi
    # Reinstall only when the project's metadata changed since the last install. An install with
    # the test extras also serves the plain one: without that, scripts/demo after scripts/test
    # (and so tests/test_demo.py under scripts/test) reinstalled the project for nothing.
    local stamp="$VENV/.installed$extras"
    if installed_since_metadata "$stamp"; then return 0; fi
    if [ -z "$extras" ] && installed_since_metadata "$VENV/.installed[test]"; then return 0; fi
    echo "==> installing the project$extras into .venv"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    # Recent pip relays the build backend's warnings even under --quiet, and setuptools always
    # emits an informational "Editable installation." notice (its InformationOnly class: "be
    # careful with folders named like your package") for an editable install of this flat
    # layout: a 10-line banner on every first install that asks nothing of the user. The -W
    # filter drops exactly that notice, in the pip process that relays it; any other warning
    # from pip or setuptools (a deprecation, say) still shows.
    "$VENV/bin/python" -W "ignore:Editable installation:UserWarning" \
        -m pip install --quiet --disable-pip-version-check -e "$ROOT$extras"
    touch "$stamp"
}
