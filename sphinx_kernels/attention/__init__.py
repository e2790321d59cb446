"""Variable-length packed attention (FlashAttention-2 style, GQA), one package of small files.

Packed layout (flash-attn's varlen layout): the tokens of ``B`` sequences are concatenated into one stream of
``T`` tokens; ``cu_seqlens`` (int32, ``(B+1,)``, ``0 = cu[0] <= cu[1] <= ... <= cu[B] = T``) gives the
boundaries. Attention never crosses a boundary. Keys may have boundaries of their own (``cu_seqlens_k``: a KV
cache longer than the new queries, cross-attention); causal masking then aligns bottom-right, as flash-attn's
(>= 2.1), so each sequence's last query sees all its keys.

Modules, in the order an op reads: `reference` (per-sequence SDPA, and the softmax-backward formula engine),
`cpu` (the CPU engine on PyTorch's CPU flash kernels), `schedule` (the Triton work table, heaviest blocks
first), `triton_fwd` / `triton_bwd` (kernels and launchers), `op` (registered ops, engine dispatch, the
flash-attn adapter, the public function); `validation` holds every input check. Rotary embeddings are in
`sphinx_kernels.rope`.
"""

from sphinx_kernels.attention.op import varlen_attention
from sphinx_kernels.attention.reference import varlen_attention_ref

__all__ = ["varlen_attention", "varlen_attention_ref"]
