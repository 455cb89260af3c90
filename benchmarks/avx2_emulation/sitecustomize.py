"""Make vLLM's CPU backend load its AVX2 kernels on an AVX-512 CPU.

``benchmarks/side_by_side.sh`` with ``EMULATE_AVX2=1`` puts this directory on the
``PYTHONPATH`` of the vLLM server only. vLLM picks ``vllm._C_AVX2`` over its AVX-512
builds when ``torch.cpu._is_avx512_supported()`` is false; PyTorch answers that from
the CPU itself, whatever ``ATEN_CPU_CAPABILITY`` says, so it is answered here. oneDNN
(both servers' matmuls) is capped by ``ONEDNN_MAX_CPU_ISA=AVX2``, MKL by
``MKL_ENABLE_INSTRUCTIONS=AVX2`` and tokenmill by ``TOKENMILL_CPU_MAX_ISA=avx2``, which
the script sets for both.
"""

import torch.cpu

torch.cpu._is_avx512_supported = lambda: False
torch.cpu._is_avx512_bf16_supported = lambda: False
