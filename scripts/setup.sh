#!/usr/bin/env bash
# Create .venv on first use and (re)install when a requirements file changes. Sourced by run/test.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV="$ROOT/.venv"
REQ="$ROOT/${ICH_REQUIREMENTS:-requirements.txt}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(basename "$REQ")"
want="$(cat "$ROOT"/requirements*.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing $(basename "$REQ") into $VENV (first run takes a few minutes)" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ" 2> >(grep -v "^WARNING: Location" >&2)
  echo "$want" >"$stamp"
fi
