#!/usr/bin/env bash
# CPU-sized study on the 32 real BraTS2018 sample cases; options: --help.
# Uses $PYTHON when set (e.g. PYTHON=.venv/bin/python), else python3.
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/mini_study.py" "$@"
