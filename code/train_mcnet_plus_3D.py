"""Train the MC-Net+ baseline (mutual consistency of three decoders; needs a multi-decoder network: mcnet3d_v2).

``cd code && python train_mcnet_plus_3D.py [options]``: the options of train_UGMCL_3D.py with --method fixed; the
defaults below come first, so the same options given on the command line override them. The weight ramp is the
released one (ycwu1997/MC-Net ``train_mcnet_3d.py``: ``--consistency 1 --consistency_rampup 40``, every 150
iterations); see ``methods/mcnet_plus.py``.
"""

from __future__ import annotations

import sys

from train_UGMCL_3D import main

# Its own run folder ../model/<exp>_<labeled_num>/<model>, the network the method needs, and MC-Net+'s weight ramp.
DEFAULTS = ["--exp", "BraTs2019_MCNetPlus", "--model", "mcnet3d_v2", "--consistency", "1", "--consistency_rampup", "40"]

if __name__ == "__main__":
    sys.exit(main([*DEFAULTS, *sys.argv[1:]], method="mcnet_plus"))
