"""Train the supervised-only baseline (labelled patches only).

``cd code && python train_supervised_3D.py [options]``: the options of train_UGMCL_3D.py with --method fixed; the
defaults below come first, so the same options given on the command line override them.
"""

from __future__ import annotations

import sys

from train_UGMCL_3D import main

# Its own run folder ../model/<exp>_<labeled_num>/<model>, and the network the method needs.
DEFAULTS = ["--exp", "BraTs2019_Supervised"]

if __name__ == "__main__":
    sys.exit(main([*DEFAULTS, *sys.argv[1:]], method="supervised"))
