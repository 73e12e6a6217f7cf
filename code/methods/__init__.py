"""Training methods: each is a loss over the same batch, student and teacher; the loop is shared.

``METHODS`` maps the ``--method`` names to their classes (a plain dict: no registry, no lookup magic).
UG-MCL and the baselines of the paper's Table 4: supervised only, Mean Teacher, UA-MT, entropy minimisation,
DTC and URPC; and MC-Net+ (``mcnet_plus``).
"""

from __future__ import annotations

from methods.base import Batch, Method
from methods.bcp import BCP
from methods.dtc import DTC
from methods.entropy_min import EntropyMinimization
from methods.mcnet_plus import MCNetPlus
from methods.mean_teacher import MeanTeacher
from methods.supervised import Supervised
from methods.uamt import UAMT
from methods.ugmcl import UGMCL
from methods.urpc import URPC

METHODS: dict[str, type[Method]] = {
    "ugmcl": UGMCL,
    "supervised": Supervised,
    "mean_teacher": MeanTeacher,
    "uamt": UAMT,
    "entropy_min": EntropyMinimization,
    "dtc": DTC,
    "urpc": URPC,
    "bcp": BCP,
    "mcnet_plus": MCNetPlus,
}

__all__ = [
    "BCP",
    "DTC",
    "METHODS",
    "UAMT",
    "UGMCL",
    "URPC",
    "Batch",
    "EntropyMinimization",
    "MCNetPlus",
    "MeanTeacher",
    "Method",
    "Supervised",
]
