"""Train the BCP baseline (bidirectional copy-paste, Bai et al. CVPR 2023): copy-paste pre-training, then
mean-teacher self-training, in one run (``methods/bcp.py``).

``cd code && python train_bcp_3D.py [options]``: the options of train_UGMCL_3D.py with --method fixed, and the
BCP options below; the defaults come first, so the same options given on the command line override them.
``--model`` defaults to ``vnet`` on LA / Pancreas (BCP's network) and ``unet_3D_dt`` on BraTS (the other
baselines' network). BCP's LA schedule is 2000 + 15000 iterations: ``--dataset la --max_iterations 17000``
(with ``--batch_size 8 --labeled_bs 4`` for its batch).
"""

from __future__ import annotations

import sys

from train_UGMCL_3D import main

# Its own run folder ../model/<exp>_<labeled_num>/<model>.
DEFAULTS = ["--exp", "BraTs2019_BCP"]

if __name__ == "__main__":
    sys.exit(main([*DEFAULTS, *sys.argv[1:]], method="bcp"))
