#!/usr/bin/env bash
# Build the one-file appliance: dist/appliance.
#
#   bash build/build.sh
#
# Environment:
#   APPLIANCE_BUILD_VENV  venv to build in (default: .venv-build in the repo, created if missing);
#                         point it at an existing test venv to reuse it
#   PYTHON                interpreter used to create a new venv (default: python3.11, else python3)
#
# Idempotent, quiet on success (one summary line); on failure it prints the PyInstaller log.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="${APPLIANCE_BUILD_VENV:-$ROOT/.venv-build}"
WORK="build/.work"
LOG="$WORK/build.log"
mkdir -p "$WORK"

fail() {
    echo "build.sh: $*" >&2
    exit 1
}

if [[ ! -x "$VENV/bin/python" ]]; then
    if [[ -n "${APPLIANCE_BUILD_VENV:-}" ]]; then
        fail "APPLIANCE_BUILD_VENV=$VENV is not a venv (no bin/python)"
    fi
    PY="${PYTHON:-$(command -v python3.11 || command -v python3 || true)}"
    [[ -n "$PY" ]] || fail "no python3.11 found to create $VENV (set PYTHON)"
    "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
        || fail "$PY is not Python 3.11 (the appliance needs 3.11; set PYTHON)"
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || fail "$VENV is not a Python 3.11 venv"

# pip install -e '.[build]' once per pyproject.toml: collect_submodules("appliance") needs the package
# importable (it silently collects nothing otherwise), and this checkout must be the one installed.
STAMP="$VENV/.appliance-build-stamp"
WANT="$ROOT $(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]] \
    || ! "$VENV/bin/python" -c 'import PyInstaller, appliance' >/dev/null 2>&1; then
    if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[build]" \
        >"$WORK/pip.log" 2>&1; then
        cat "$WORK/pip.log" >&2
        fail "pip install -e '.[build]' failed in $VENV (log: $WORK/pip.log)"
    fi
    echo "$WANT" >"$STAMP"
fi
INSTALLED="$("$VENV/bin/python" -c 'import appliance, pathlib; print(pathlib.Path(appliance.__file__).parent.parent)')"
[[ "$INSTALLED" == "$ROOT" ]] || fail "$VENV imports appliance from $INSTALLED, not from $ROOT"

if ! "$VENV/bin/pyinstaller" --noconfirm --clean --log-level WARN \
    --distpath dist --workpath "$WORK" build/appliance.spec >"$LOG" 2>&1; then
    cat "$LOG" >&2
    fail "pyinstaller failed (log: $LOG)"
fi

# Smoke check: the binary starts, parses its CLI and reports the version of the code it was built from.
BIN="dist/appliance"
VERSION="$("$VENV/bin/python" -c 'import appliance; print(appliance.__version__)')"
"$BIN" --help >/dev/null || fail "$BIN --help failed (a noexec TMPDIR? see README)"
GOT="$("$BIN" version)" || fail "$BIN version failed"
[[ "$GOT" == "appliance $VERSION" ]] || fail "$BIN version printed '$GOT', expected 'appliance $VERSION'"

SIZE="$(stat -c %s "$BIN")"
echo "built $BIN: appliance $VERSION, $((SIZE / 1000000)).$(((SIZE % 1000000) / 100000)) MB"
