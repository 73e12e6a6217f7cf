#!/usr/bin/env bash
# The paper's LA protocol on a GPU box: every method, 16 and 8 labelled of 80, several seeds (default 3), V-Net,
# 112x112x80, 6000 iterations, step lr; each run tested on test.list with its best-val and its last checkpoint;
# one Markdown table beside the paper's LA numbers (results/la_table.md).
# = reproduce_brats2019.py --dataset la; options (--dry-run, --seeds, --root_path ...): --help.
# Uses $PYTHON when set (e.g. PYTHON=.venv/bin/python), else python3.
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/reproduce_brats2019.py" --dataset la "$@"
