"""Reference attention backend in plain PyTorch; runs on CPU and GPU.

Decodes (one query token per request) are batched: K/V are gathered from the
paged cache through the block tables and masked past each sequence's length.
Prefill chunks are handled one request at a time with
``scaled_dot_product_attention`` (a fused kernel that does not keep the full
score matrix) over the cached prefix plus the new tokens.

On the CPU, native kernels read K/V in place from the paged cache
(:mod:`tokenmill.kernels.cpu`): sequences with short queries (decodes,
speculative verification, chunks of up to ``SHORT_QUERY_LEN`` tokens) go to a
per-query kernel, longer prefill chunks of float32 models (over a float32, 16-bit or 8-bit
cache) to a tiled one (for a 512-token prompt 1.6x the SDPA path on an AVX2 core, 1.9x with
AVX-512). The PyTorch code above is the fallback when they cannot be built, and the path for
long chunks of bfloat16 models.

Sliding windows: prefill chunks gather only the blocks that hold a key some
query of the chunk can see and mask by both ends; batched decodes mask keys
before the window (the blocks they gather there are never looked at); the
native kernel starts each query's walk at its window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.attention.base import AttentionMetadata, window_start
from tokenmill.kernels import cpu as cpu_kernels
from tokenmill.kernels.kv_quant import to_cache_rows, to_model_rows

# Longest query the native CPU kernel takes; longer prefill chunks use SDPA.
SHORT_QUERY_LEN = 16
# A limit no chunk reaches (int32 in the kernels' arguments): one kernel for every query.
UNLIMITED_QUERY_LEN = 1 << 30


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    has_padding: bool | None = None,
) -> None:
    """Scatter new K/V rows into their cache slots; slots < 0 are padding.

    A quantized cache (``--kv-cache-dtype int8|fp8``) gets the rows quantized,
    each with its scale (:mod:`tokenmill.kernels.kv_quant`); a 16-bit one
    (``bfloat16|float16``) gets them rounded to nearest even.
    ``has_padding`` is the host's answer to "is any slot < 0" (None: check here,
    which syncs with the device).
    """
    n = slot_mapping.shape[0]
    k, v = k[:n], v[:n]
    if has_padding is None:
        has_padding = bool(n and (slot_mapping < 0).any())
    if has_padding:
        keep = slot_mapping >= 0
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    flat_k.index_copy_(0, slot_mapping, to_cache_rows(k, k_cache))
    flat_v.index_copy_(0, slot_mapping, to_cache_rows(v, v_cache))


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int,
              first_block: int = 0) -> torch.Tensor:
    """Contiguous copy of one sequence's cached K or V rows (as stored) for positions
    ``first_block * block_size .. length - 1`` ([n, kv_heads, row])"""
    block_size = cache.shape[1]
    nblocks = (length + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[first_block:nblocks].long())
    return blocks.reshape(-1, *cache.shape[2:])[: length - first_block * block_size]


class TorchAttentionBackend:
    """Paged attention with stock PyTorch operations.

    ``short_query_len``: the longest query the native per-query kernel takes on the CPU
    (longer prompt chunks go to the tiled kernel, or SDPA). The two kernels add in
    different orders, so a prompt's numbers then depend on how the scheduler chunked it;
    a batch-invariant engine (``EngineArgs.batch_invariant``) lifts the limit: one kernel
    for every query.
    """

    name = "torch"

    def __init__(self, short_query_len: int = SHORT_QUERY_LEN) -> None:
        self.short_query_len = short_query_len

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping, meta.has_padding_slots)
        return self._attend(q, k_cache, v_cache, meta, scale, sliding_window)

    def forward_cached(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """:meth:`forward` for a step whose new K/V rows are already in the cache
        (e.g. written by :func:`tokenmill.kernels.cpu.rope_kv_write`)."""
        return self._attend(q, k_cache, v_cache, meta, scale, sliding_window)

    def _attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        out = q.new_zeros(q.shape)  # contiguous even when q is a strided view
        if meta.num_seqs == 0:
            return out
        window = sliding_window
        short = self.short_query_len
        if q.device.type == "cpu" and cpu_kernels.paged_attention(
            q, out, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
            scale, short, window or 0,
        ):
            if meta.max_query_len > short and not cpu_kernels.prefill_attention(
                q, out, k_cache, v_cache, meta.query_start_loc, meta.seq_lens,
                meta.block_tables, scale, short, window or 0,
            ):
                self._prefill_each(q, out, k_cache, v_cache, meta, scale, window, short)
            return out
        if meta.is_decode_only:
            b = meta.num_seqs
            out[:b] = self._decode(q[:b], k_cache, v_cache, meta, scale, window)
            return out
        self._prefill_each(q, out, k_cache, v_cache, meta, scale, window)
        return out

    def _prefill_each(
        self,
        q: torch.Tensor,
        out: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
        skip_up_to: int = 0,
    ) -> None:
        """Attend every sequence with more than ``skip_up_to`` query tokens, one at a time."""
        qsl = meta.query_start_loc_cpu
        for i, seq_len in enumerate(meta.seq_lens_cpu):
            start, end = qsl[i], qsl[i + 1]
            if end - start <= skip_up_to:
                continue
            out[start:end] = self._prefill_one(
                q[start:end], k_cache, v_cache, meta.block_tables[i], seq_len, scale, window
            )

    @staticmethod
    def _prefill_one(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_table: torch.Tensor,
        seq_len: int,
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:
        q_len = q.shape[0]
        out_dtype = q.dtype
        if k_cache.dtype != q.dtype:
            # 8-bit KV (or a 16-bit cache of another type than the model's) is widened to
            # float32 and attended in float32 (as the native kernels do), not rounded again
            # to a 16-bit model dtype.
            q = q.float()
        # Only blocks holding a key some query of the chunk can see (all, without a window).
        first_block = window_start(seq_len - q_len, window) // k_cache.shape[1]
        keys = to_model_rows(gather_kv(k_cache, block_table, seq_len, first_block), q.dtype)
        values = to_model_rows(gather_kv(v_cache, block_table, seq_len, first_block), q.dtype)
        # [1, heads, tokens, dim] for SDPA; GQA handled by enable_gqa. The batch dimension
        # matters: on the CPU, 3-D inputs took a path 2.6x (float32) to 4.4x (bfloat16)
        # slower for a 128-token prompt (docs/performance.md).
        qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, keys, values))
        if q_len == seq_len and (window is None or window >= seq_len):
            o = F.scaled_dot_product_attention(
                qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            # Query j sits at absolute position seq_len - q_len + j (bottom-right causal).
            qpos = torch.arange(seq_len - q_len, seq_len, device=q.device)
            kpos = torch.arange(first_block * k_cache.shape[1], seq_len, device=q.device)
            mask = kpos[None, :] <= qpos[:, None]
            if window is not None:
                mask &= kpos[None, :] > qpos[:, None] - window
            o = F.scaled_dot_product_attention(
                qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True
            )
        return o[0].transpose(0, 1).to(out_dtype)

    @staticmethod
    def _decode(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:
        b, num_heads, head_dim = q.shape
        out_dtype = q.dtype
        if k_cache.dtype != q.dtype:
            q = q.float()  # attend a cache of another type in float32 (see _prefill_one)
        block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
        group = num_heads // num_kv_heads
        nblocks = (meta.max_seq_len + block_size - 1) // block_size
        table = meta.block_tables[:b, :nblocks].long()
        # [B, L, kv_heads, D] with L = nblocks * block_size, masked past seq_len.
        rows = k_cache.shape[-1]
        keys = to_model_rows(k_cache[table].reshape(b, -1, num_kv_heads, rows), q.dtype)
        values = to_model_rows(v_cache[table].reshape(b, -1, num_kv_heads, rows), q.dtype)
        qg = q.view(b, num_kv_heads, group, head_dim)
        scores = torch.einsum("bhgd,blhd->bhgl", qg, keys) * scale
        length = keys.shape[1]
        kpos = torch.arange(length, device=q.device)[None, :]
        valid = kpos < meta.seq_lens[:b, None]
        if window is not None:
            valid &= kpos >= meta.seq_lens[:b, None] - window
            # Blocks before the window may have been released and reused: never let
            # whatever they hold (even NaN) into the weighted sum.
            values = values.masked_fill(~valid[:, :, None, None], 0.0)
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.einsum("bhgl,blhd->bhgd", probs, values)
        return out.reshape(b, num_heads, head_dim).to(out_dtype)
