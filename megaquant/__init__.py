"""megaquant: exact, safe low-precision training experiments on Megatron-LM.

`import megaquant` never imports torch, triton or megatron.
"""

from __future__ import annotations

from megaquant.errors import MegaquantError

__all__ = ["MegaquantError", "__version__"]

__version__ = "0.1.0"
