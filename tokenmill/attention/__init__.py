"""Attention backends behind one interface, and the per-step metadata they read.

``base`` defines :class:`AttentionMetadata` and the backend protocol; ``torch_backend``
runs everywhere (with native CPU kernels for short queries); ``triton_backend`` is
the GPU path. The model's layers call a backend; the runner builds the metadata.
"""
