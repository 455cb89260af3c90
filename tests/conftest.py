"""Suite-wide settings.

A float32 CPU model multiplies its dense layers in bfloat16 on CPUs with bfloat16
in hardware (:func:`tokenmill.model.dequant_matmul.default_dense_dtype`). Most tests
compare the engine with float32 references (HF transformers, the PyTorch path) token
for token, so the suite keeps float32 GEMMs on every machine, for this process and
the servers it starts; tests of the bfloat16 path ask for it by name. Set before any
tokenmill module reads it.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENMILL_DENSE_DTYPE", "float32")
