"""HER data building: SFT samples per character perspective and balanced preference pairs.

The reverse-synthesis stages that need a teacher model (role-thinking augmentation,
system-thinking construction, setting completion) are not implemented yet.
"""

from ._pairs import DEFAULT_MIX, MixConfig, balance, flip
from ._sft import sft_records

__all__ = ["DEFAULT_MIX", "MixConfig", "balance", "flip", "sft_records"]
