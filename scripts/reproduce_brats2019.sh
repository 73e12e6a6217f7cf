#!/usr/bin/env bash
# Paper Table 4 on BraTS2019 (all methods, 25 and 50 labelled, several seeds); options: --help.
# Uses $PYTHON when set (e.g. PYTHON=.venv/bin/python), else python3.
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/reproduce_brats2019.py" "$@"
