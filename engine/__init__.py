"""unbake engine: everything that touches torch lives in this package.

This file must stay import-light: ``engine.protocol`` and ``engine.errors`` are imported
by the torch-free client, so nothing here may import torch.
"""

__version__ = "0.1.0"
