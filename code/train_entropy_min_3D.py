"""Train the entropy-minimisation baseline.

``cd code && python train_entropy_min_3D.py [options]``: the options of train_UGMCL_3D.py with --method fixed; the
defaults below come first, so the same options given on the command line override them.
"""

from __future__ import annotations

import sys

from train_UGMCL_3D import main

# Its own run folder ../model/<exp>_<labeled_num>/<model>, and the network the method needs.
DEFAULTS = ["--exp", "BraTs2019_Entropy_Minimization"]

if __name__ == "__main__":
    sys.exit(main([*DEFAULTS, *sys.argv[1:]], method="entropy_min"))
