"""Suite-wide settings.

``--dtype auto`` picks bfloat16 on CPUs with bfloat16 in hardware
(:func:`tokenmill.engine.args.default_cpu_dtype`). Most tests compare the engine with
float32 references (HF transformers, the PyTorch path) token for token, so the suite
pins ``auto`` to float32 on every machine, for this process and the servers it
starts; tests of the bfloat16 path ask for it by name or clear the variable.
"""

from __future__ import annotations

import os

from tokenmill.engine.args import CPU_DTYPE_ENV

os.environ.setdefault(CPU_DTYPE_ENV, "float32")
