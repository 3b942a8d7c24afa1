"""The HDF5 feature cache: the contract between ``extract`` and ``headlab``.

Depends on h5py and numpy only.
"""

from cache.errors import Stage1Error
from cache.format import FORMAT_NAME, FORMAT_VERSION, fingerprint_of
from cache.reader import FeatureCache, open_cache
from cache.writer import ShardWriter

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FeatureCache",
    "ShardWriter",
    "Stage1Error",
    "fingerprint_of",
    "open_cache",
]
