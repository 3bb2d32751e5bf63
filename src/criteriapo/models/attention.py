"""Attention for packed rows that computes only what their mask allows.

A packed row holds segments ``prompt | completion 1 | completion 2 | ...`` (see
:mod:`criteriapo.rows.packing`). With a custom (L, L) mask, SDPA computes the whole square and then
masks most of it: other segments, completion 2's view of completion 1, everything above the
diagonal. Here each row is cut into *pieces*, each a run of queries that attends a key prefix (the
prompt its completion follows, possibly empty) and then itself causally:

- a segment's prompt with its first completion: one causal block (``is_causal``);
- each further completion: the prompt's keys, then its own causally (a lower-right causal mask
  over ``prompt + completion`` keys);
- padding: zeros (no label reads it, no other token attends it).

So the chosen x rejected block, the blocks between segments and the upper triangles are never
computed, and grouped-query models keep their K/V heads unrepeated (``enable_gqa``). The values are
those of SDPA with the full mask, up to the order of float sums.

On a CPU in float32, all pieces of a batch are one autograd node that calls the flash kernel
itself (:class:`CpuPieces`): a piece with a prefix as two calls merged, and each backward with its
rows halved into a batch of two where that keeps both threads busy (:func:`flash_backward`).

On a GPU no piece gives SDPA an explicit mask: causal pieces run the kernel SDPA picks for
``is_causal`` (cuDNN or flash, K/V heads unrepeated), and a lower-right piece goes to the flash or
memory-efficient kernel through ``causal_lower_right``. Flash (fp16, bf16) groups the query heads
itself; the memory-efficient kernel (float32) takes the piece only with as many K/V heads as query
heads, so there a grouped-query model's K/V are repeated for that piece alone
(:func:`flash_takes_gqa`). cuDNN's attention backward with an explicit mask (reported NaN at lengths
64 mod 128) is therefore never reached through pieces, and a masked call without pieces runs without
cuDNN when gradients are wanted (:func:`avoid_cudnn`).

The implementation is registered with transformers as :data:`PIECES`: a model set to it computes
plain SDPA for every call that brings no pieces (generation, unpacked batches), and for a packed
batch that brings them through the forward's keyword arguments. A model whose forward does not pass
them on gets the full mask instead, which is exact too.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.backends.cuda import SDPAParams, can_use_flash_attention
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from torch.utils._python_dispatch import _disable_current_modes
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PIECES = "criteriapo_pieces"
# (query start, query end, prefix start, prefix end) within a row: queries [q0, q1) attend keys
# [p0, p1) (all of them) and then [q0, q1) causally; p0 == p1 is no prefix
Piece = tuple[int, int, int, int]
# what SDPA-based attention can be asked to do that pieces do not
_UNSUPPORTED = ("softcap", "sliding_window", "s_aux", "position_bias")
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
# rows below which a CPU flash backward is not halved: the halves' smaller kernel blocks cost more than
# the idle thread (whole DPO steps at 256 tokens per sequence: 0.96x with pieces of 64 rows or more
# halved, 1.03x with 256 or more; benchmarks/flash_backward.py)
HALVE_ROWS = 256


def piece_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    pieces: list[list[Piece]] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (R, Hq, L, D), key/value (R, Hkv, L, D) ->
    (R, L, Hq, D). Without ``pieces``, exactly transformers' SDPA attention."""
    if pieces is None:
        masked = avoid_cudnn(query.device.type, attention_mask is not None)
        options = {"dropout": dropout, "scaling": scaling, "is_causal": is_causal, **kwargs}
        with _without_cudnn() if masked else nullcontext():
            return sdpa_attention_forward(module, query, key, value, attention_mask, **options)
    asked = [k for k in _UNSUPPORTED if kwargs.get(k) is not None]
    assert not asked, f"piece attention was given {asked}; packing_problem should have refused this model"
    assert len(pieces) == query.shape[0], (len(pieces), query.shape)
    device = query.device.type
    if torch.is_autocast_enabled(device):  # as autocast casts SDPA's inputs (a CausalBias mask bypasses it)
        dtype = torch.get_autocast_dtype(device)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    options = {"dropout_p": dropout, "scale": scaling, "enable_gqa": query.shape[1] != key.shape[1]}
    if _splits(query, options):
        return CpuPieces.apply(query, key, value, pieces, options["scale"]), None
    rows = [
        _row(query[r : r + 1], key[r : r + 1], value[r : r + 1], row, options) for r, row in enumerate(pieces)
    ]
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def _row(query, key, value, row: list[Piece], options: dict) -> torch.Tensor:
    """One row (1, H, L, D): its pieces in order, zeros where no piece is (padding)."""
    length = query.shape[2]
    parts, at = [], 0
    for q0, q1, p0, p1 in row:
        if q0 > at:
            parts.append(value.new_zeros(1, query.shape[1], q0 - at, value.shape[-1]))
        q, k, v = query[:, :, q0:q1], key[:, :, q0:q1], value[:, :, q0:q1]
        if p1 > p0:  # (q, prefix + q) keys: all of the prefix, then causal, aligned at the bottom right
            k = torch.cat([key[:, :, p0:p1], k], dim=2)
            v = torch.cat([value[:, :, p0:p1], v], dim=2)
            mask, piece = _lower_right(q1 - q0, k.shape[2]), options
            if options["enable_gqa"] and q.is_cuda and not flash_takes_gqa(q, k, v, options["dropout_p"]):
                # on a GPU, past the flash kernel (float32, say), a lower-right mask runs the efficient
                # kernel only with as many K/V heads as query heads (else SDPA gets it as an explicit
                # mask); this piece's are repeated
                repeat = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
                piece = {**options, "enable_gqa": False}
            parts.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **piece))
        else:
            parts.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, **options))
        at = q1
    if at < length:
        parts.append(value.new_zeros(1, query.shape[1], length - at, value.shape[-1]))
    return torch.cat(parts, dim=2)


def flash_takes_gqa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float) -> bool:
    """Whether SDPA's flash kernel takes a lower-right piece with its K/V heads unrepeated: the question
    a lower-right mask (``CausalBias``) asks before it calls that kernel, which groups query heads
    natively. On a GPU it needs fp16 or bf16 among other things; on a CPU it is always False."""
    return can_use_flash_attention(SDPAParams(query, key, value, None, dropout, False, True))


def _lower_right(queries: int, keys: int):
    """A lower-right causal mask, made outside any dispatch mode: selective checkpointing's mode
    cannot make this tensor subclass."""
    with _disable_current_modes():
        return causal_lower_right(queries, keys)


def _splits(query: torch.Tensor, options: dict) -> bool:
    """Whether pieces run through this module's own CPU flash function (:class:`CpuPieces`): on a
    CPU, whose flash kernel is causal from the top left only (a lower-right mask would be
    materialised and every masked block computed), without dropout (the two halves would draw
    apart), in float32 (in bf16 each half's output would be rounded before the merge, so a reply's
    values would depend on whether it came first after its prompt or later: a reference scored in
    other batches than the policy trains on would no longer match it; and each half's gradients
    would be rounded before they are added)."""
    return query.device.type == "cpu" and not options["dropout_p"] and query.dtype == torch.float32


class CpuPieces(torch.autograd.Function):
    """Every piece of every row as one autograd node, on a CPU in float32 (:func:`_splits`): query
    (R, Hq, L, D), key/value (R, Hkv, L, D) -> (R, L, Hq, D), the layout the output projection reads.
    K/V keep their own head count (grouped queries run natively).

    A piece without a prefix is one causal flash call. A piece with one runs the lower-right causal
    attention over ``prefix + own`` keys as two flash calls that each skip what they need not
    compute (the prefix unmasked, the own keys causal from the top left), merged by their
    log-sum-exps (:func:`_prefixed`). Backward gives each half's flash backward the merged output and
    log-sum-exp: each half's probabilities are then those of the whole softmax restricted to its
    keys, and the row term ``sum(dO * O)`` is the whole's, so the half gradients are exact parts of
    the whole's (dQ their sum, dK and dV each in its place).

    Each piece's output is written into its place and its gradients into theirs, so nothing is
    concatenated and no slice's backward makes a row-sized zero tensor per piece that autograd then
    adds up (one per piece for each of Q, K and V). Padding is zeros both ways."""

    @staticmethod
    def forward(ctx, query, key, value, pieces, scale):
        rows, heads, length, dim = query.shape
        out = query.new_zeros(rows, length, heads, dim)
        lses = []
        for r, row in enumerate(pieces):
            for q0, q1, p0, p1 in row:
                q, k, v = (t[r : r + 1, :, q0:q1] for t in (query, key, value))
                if p1 > p0:
                    o, lse = _prefixed(q, key[r : r + 1, :, p0:p1], value[r : r + 1, :, p0:p1], k, v, scale)
                else:
                    o, lse = _flash(q, k, v, is_causal=True, scale=scale)
                out[r, q0:q1] = o[0].transpose(0, 1)
                lses.append(lse)
        ctx.save_for_backward(query, key, value, out, *lses)
        ctx.pieces, ctx.scale = pieces, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, out, *lses = ctx.saved_tensors
        dq, dk, dv = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
        lse = iter(lses)
        for r, row in enumerate(ctx.pieces):
            for q0, q1, p0, p1 in row:  # added, not set: a prefix's keys get gradients from later pieces
                g, o = (t[r : r + 1, q0:q1].transpose(1, 2).contiguous() for t in (grad, out))
                q, k, v = (t[r : r + 1, :, q0:q1] for t in (query, key, value))
                piece_lse = next(lse)
                dq_own, dk_own, dv_own = flash_backward(g, q, k, v, o, piece_lse, True, ctx.scale)
                dq[r : r + 1, :, q0:q1] = dq_own
                dk[r : r + 1, :, q0:q1] += dk_own
                dv[r : r + 1, :, q0:q1] += dv_own
                if p1 > p0:
                    pk, pv = key[r : r + 1, :, p0:p1], value[r : r + 1, :, p0:p1]
                    dq_p, dk_p, dv_p = flash_backward(g, q, pk, pv, o, piece_lse, False, ctx.scale)
                    dq[r : r + 1, :, q0:q1] += dq_p
                    dk[r : r + 1, :, p0:p1] += dk_p
                    dv[r : r + 1, :, p0:p1] += dv_p
        return dq, dk, dv, None, None


def _prefixed(query, prefix_key, prefix_value, own_key, own_value, scale):
    """(output, log-sum-exp) of queries (1, Hq, n, D) over a prefix's keys, all of them, and then
    their own keys causally, as two flash calls merged."""
    out_prefix, lse_prefix = _flash(query, prefix_key, prefix_value, is_causal=False, scale=scale)
    out_own, lse_own = _flash(query, own_key, own_value, is_causal=True, scale=scale)
    lse = torch.logaddexp(lse_prefix, lse_own)  # (1, Hq, n), float32
    out = out_prefix.float() * (lse_prefix - lse).exp().unsqueeze(-1)
    return (out + out_own.float() * (lse_own - lse).exp().unsqueeze(-1)).to(query.dtype), lse


def flash_backward(grad, query, key, value, out, lse, causal: bool, scale):
    """The CPU flash kernel's backward for queries (1, Hq, n, D), ``out`` and ``lse`` those of their
    whole softmax (which may span more keys than ``key``). The kernel hands each thread whole
    (batch, head) pairs, so 9 heads on 2 threads take 5 heads' time where 4.5 would do; when halving
    the rows evens that out (:func:`halving_helps`), the rows run as a batch of two:
    :func:`_unmasked_halves` or :func:`_causal_halves`. Only the order of the float sums changes."""
    if not halving_helps(query.shape[1], query.shape[2], torch.get_num_threads()):
        return _flash_backward(grad, query, key, value, out, lse, 0.0, causal, scale=scale)
    halves = _causal_halves if causal else _unmasked_halves
    return halves(grad, query, key, value, out, lse, scale)


def halving_helps(heads: int, rows: int, threads: int) -> bool:
    """Whether twice the (batch, head) pairs, each with half the rows, take fewer rounds of
    ``threads`` than the pairs as they are (each round as long as one pair: half as long halved)."""
    return rows >= HALVE_ROWS and -(-2 * heads // threads) < 2 * -(-heads // threads)


def _windows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Rows [0, m) and [n - m, n) of ``t`` (dim 2, n = ``rows``, m = ceil(n / 2)) as a batch of two;
    for an odd n they share row m - 1."""
    m = (rows + 1) // 2
    return torch.cat([t[:, :, :m], t[:, :, rows - m :]])


def _windows_grad(grad: torch.Tensor, rows: int) -> torch.Tensor:
    """:func:`_windows` of the output gradient, the shared row zeroed in the second window: a row whose
    output gradient is 0 adds nothing to any gradient, so the first window alone counts it."""
    two = _windows(grad, rows)
    two[1:, :, : rows % 2] = 0
    return two


def _joined(two: torch.Tensor, rows: int) -> torch.Tensor:
    """The rows' gradient back from :func:`_windows` (the shared row from the first window)."""
    return torch.cat([two[:1], two[1:, :, rows % 2 :]], dim=2)


def _unmasked_halves(grad, query, key, value, out, lse, scale):
    """All keys for every row: each half of the rows over all keys, their key gradients added."""
    n = query.shape[2]
    key, value = (t.expand(2, -1, -1, -1).contiguous() for t in (key, value))
    query, out, lse = (_windows(t, n) for t in (query, out, lse))
    dq, dk, dv = _flash_backward(_windows_grad(grad, n), query, key, value, out, lse, 0.0, False, scale=scale)
    return _joined(dq, n), dk.sum(0, keepdim=True), dv.sum(0, keepdim=True)


def _causal_halves(grad, query, key, value, out, lse, scale):
    """Own keys causally: the two diagonal blocks (each window over its own keys, causal) as a batch
    of two, and the rows after the first window over the keys before the second (unmasked, through
    :func:`flash_backward`), so each (row, key) pair is counted once."""
    n = query.shape[2]
    m, s = (n + 1) // 2, n // 2  # the first window's end, the second's start
    diagonal = [_windows(t, n) for t in (query, key, value, out, lse)]
    dq2, dk2, dv2 = _flash_backward(_windows_grad(grad, n), *diagonal, 0.0, True, scale=scale)
    dq_r, dk_r, dv_r = flash_backward(
        grad[:, :, m:],
        query[:, :, m:],
        key[:, :, :s],
        value[:, :, :s],
        out[:, :, m:],
        lse[:, :, m:],
        False,
        scale,
    )
    dq = _joined(dq2, n)
    dq[:, :, m:] += dq_r
    return dq, _key_grads(dk2, dk_r, n), _key_grads(dv2, dv_r, n)


def _key_grads(two: torch.Tensor, early: torch.Tensor, n: int) -> torch.Tensor:
    """A key gradient of :func:`_causal_halves`: the first window's keys, the second's and the keys
    before the second window (from the rows after the first), added where they meet."""
    m, s = (n + 1) // 2, n // 2
    whole = two.new_zeros(1, two.shape[1], n, two.shape[3])
    whole[:, :, :m] += two[:1]
    whole[:, :, s:] += two[1:]
    whole[:, :, :s] += early
    return whole


def avoid_cudnn(device_type: str, masked: bool) -> bool:
    """Whether SDPA must not pick cuDNN: on a GPU, with an explicit mask, when gradients are wanted
    (cuDNN's attention backward has given NaN with an explicit mask at lengths 64 mod 128; pieces
    never pass one, this is for a forward that does not pass them on)."""
    return device_type == "cuda" and masked and torch.is_grad_enabled()


def _without_cudnn():
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


AttentionInterface.register(PIECES, piece_attention)
AttentionMaskInterface.register(PIECES, sdpa_mask)


def use_pieces(model: torch.nn.Module) -> bool:
    """Set ``model`` (or the transformers model inside a wrapper) from SDPA to :data:`PIECES`, which
    is SDPA for every call without pieces; True when it uses pieces (set now or before). Any other
    attention is left as it is."""
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation == PIECES:
        return True
    if implementation != "sdpa":
        return False
    inner = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if inner is None:
        return False
    inner.set_attn_implementation(PIECES)
    return getattr(model.config, "_attn_implementation", None) == PIECES
