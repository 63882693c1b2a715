"""Compression families, found by name: ``svd``, ``fwsvd``, ``asvd``, ``svd-llm``, ``basis-sharing``.

Each family is a config dataclass (subclass of :class:`FamilyConfig`) plus a registered :class:`Transform`;
``rankserve.compress.compress_`` applies any of them. Importing this package registers them all.
"""

from rankserve.checkpoint.manifest import RATIO_CONVENTION  # re-exported: tables print it
from rankserve.families import asvd, basis_sharing, fwsvd, svd, svd_llm  # noqa: F401  (registration)
from rankserve.families.asvd import ASVDConfig
from rankserve.families.base import (
    RANK_RULE,
    FamilyConfig,
    Slot,
    SlotData,
    SlotResult,
    Transform,
    config_class,
    config_from_dict,
    family_names,
    transform_for,
)
from rankserve.families.basis_sharing import BasisSharingConfig
from rankserve.families.fwsvd import FWSVDConfig
from rankserve.families.svd import SVDConfig
from rankserve.families.svd_llm import SVDLLMConfig

__all__ = [
    "RANK_RULE",
    "RATIO_CONVENTION",
    "ASVDConfig",
    "BasisSharingConfig",
    "FWSVDConfig",
    "FamilyConfig",
    "SVDConfig",
    "SVDLLMConfig",
    "Slot",
    "SlotData",
    "SlotResult",
    "Transform",
    "config_class",
    "config_from_dict",
    "family_names",
    "transform_for",
]
