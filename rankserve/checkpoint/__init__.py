"""The rankserve checkpoint: a self-describing, versioned HF-style directory for compressed models.

:mod:`~rankserve.checkpoint.manifest` holds the manifest's schema, build and validation (and the one
``RATIO_CONVENTION``); :mod:`~rankserve.checkpoint.io` the atomic save and the checked load;
:mod:`~rankserve.checkpoint.int8` the int8 record (format version 2).
"""

from rankserve.checkpoint.int8 import INT8_FORMAT_VERSION
from rankserve.checkpoint.io import (
    check_out_dir,
    load_checkpoint,
    recover_leftovers,
    save_checkpoint,
)
from rankserve.checkpoint.manifest import (
    CONFIG_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    RATIO_CONVENTION,
    SUPPORTED_VERSIONS,
    WEIGHTS_NAME,
    build_manifest,
    read_manifest,
    validate_manifest,
    with_quantization,
)
from rankserve.checkpoint.names import BASIS_PREFIX, CheckpointError
from rankserve.io.safetensors import write_safetensors

__all__ = [
    "BASIS_PREFIX",
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "INT8_FORMAT_VERSION",
    "MANIFEST_NAME",
    "RATIO_CONVENTION",
    "SUPPORTED_VERSIONS",
    "WEIGHTS_NAME",
    "CheckpointError",
    "build_manifest",
    "check_out_dir",
    "load_checkpoint",
    "read_manifest",
    "recover_leftovers",
    "save_checkpoint",
    "validate_manifest",
    "with_quantization",
    "write_safetensors",
]
