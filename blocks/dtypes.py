"""Dtypes by the names configuration files use (`dtype: float16` in a models file, a Serve
config, a pool entry), and the torch dtypes they stand for: the one table every layer reads.

Not handled here: choosing a dtype per component (`ModularPipeline.load_components` takes a
dict for that).
"""

from __future__ import annotations

from typing import Literal

import torch

DtypeName = Literal["float32", "float16", "bfloat16"]
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
