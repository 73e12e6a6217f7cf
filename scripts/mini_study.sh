#!/usr/bin/env bash
# CPU protocols on the real sample cases (--preset brats | la); options: --help.
# Uses $PYTHON when set (e.g. PYTHON=.venv/bin/python), else python3.
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/mini_study.py" "$@"
