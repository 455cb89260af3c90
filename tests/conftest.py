"""Suite-wide settings.

``--dtype auto`` picks bfloat16 on CPUs with bfloat16 in hardware
(:func:`tokenmill.engine.args.default_cpu_dtype`). Most tests compare the engine with
float32 references (HF transformers, the PyTorch path) token for token, so the suite
pins ``auto`` to float32 on every machine, for this process and the servers it
starts; tests of the bfloat16 path ask for it by name or clear the variable. For the
same reason ``--quantization auto`` is pinned to float weights (the bundled Q4_1 file
would otherwise run on its int4 codes); quantized tests ask for int4/int8 by name.
"""

from __future__ import annotations

import os

import pytest
import torch

from tokenmill.engine.args import CPU_DTYPE_ENV, CPU_QUANTIZATION_ENV

os.environ.setdefault(CPU_DTYPE_ENV, "float32")
os.environ.setdefault(CPU_QUANTIZATION_ENV, "none")


@pytest.fixture(scope="session")
def smollm2_hf():
    """transformers' SmolLM2 loaded from the bundled GGUF (float32, eval mode).

    transformers dequantizes the GGUF in Python (about 30 s on 2 cores), so the modules
    that compare against it share one copy; tests must not modify it.
    """
    import transformers

    from tokenmill.model.loader import default_model_path

    path = default_model_path()
    if not os.path.exists(path):
        pytest.skip(f"bundled model not found at {path}")
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
