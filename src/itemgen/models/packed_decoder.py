"""A lean inference forward of a Llama-family decoder that answers one query per row: the state
of each row's LAST token after the final norm, for prompts that share a constant prefix.

The Hugging Face forward, run on a left-padded batch (ItemLM.encode), spends its time where the
answer does not need it (office test users, batch 64: a mean history of 9.6 items, each row
padded to the batch's longest, up to 50): on padding, on the constant prompt prefix that every
row recomputes, and on the last layer's queries, attention output, MLP and norm at positions
whose state nobody reads. This forward removes all three and nothing else:

- rows are packed: the linear layers (q/k/v/o projections, MLP) run on the T real tokens of all
  rows as one (T, H) matrix; only the attention itself is laid out per row, (rows, heads, L, d),
  in groups of rows of similar length (the caller sorts them), so that padding stays under a
  third of a group's slots and costs L^2 per row there, not L x the model's width;
- the prefix's keys/values per layer come from a cache (computed once per weights, ``Prefix``);
  rows hold only the tokens after it, at the positions they have in the full prompt;
- the last layer computes keys/values for every token (earlier tokens are attended to) but its
  query, output projection, MLP and the final norm at each row's last token only;
- the first layer's norm and q|k|v projection of a token depend on that token alone (RoPE comes
  after them): for a vocabulary of inputs (ItemLM's `ids` prompt: items only after the prefix)
  the caller may compute them once per weights (``first_projections``) and pass each token's
  row, so that layer does not recompute them per request (office, 2 layers, 10 tokens: 15% of
  the FLOPs).

It reads the layers' own weights and modules (norm weights and epsilon, rotary embedding,
projections, activation), so it is the same arithmetic as the HF forward up to float rounding:
tests/test_packed_decoder.py checks states and top-k against ItemLM.encode on Llama and Qwen2
configs. At batch 1 a query's matmuls are about half its time and the rest is one small op after
another, so the products are grouped into fewer ops: a layer's norm weights are folded into the
projections that read the norm ((x * w) W = x (w W)), queries and keys keep each head's RoPE
pairs side by side so that RoPE is one complex product (_pairs), residual adds ride on the
projections' addmm, and what depends on the rows' lengths only (RoPE's rotations, attention
masks) is computed once per set of lengths (_Plan).

The projections' weights are kept transposed, (in, out) contiguous, and fused (q|k|v, gate|up):
MKL multiplies a few rows by an (out, in) weight, as nn.Linear hands it over, about 2x slower
than by an (in, out) one (1 thread, 10 x 576 by 576 x 1536: 1.5 ms against 0.7 ms on the shared
2-core machine), and one call per fused group saves a call's overhead per projection. The copies cost the layers' size once (not the embeddings') and live as long as the
weights do (ItemLM._packed_state). Architectures whose layers differ (extra q/k norms, sliding
windows, other norms, a RoPE that depends on the length) are not ``supported`` and keep the HF
forward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED_TYPES = ("llama", "qwen2")  # decoder layers: RMSNorm -> attention(RoPE) -> RMSNorm -> MLP
STATIC_ROPE = ("default", "linear", "llama3")  # a position's rotation does not depend on the sequence


def supported(decoder) -> bool:
    """Whether ``decoder`` (an HF base model: embed_tokens, layers, norm, rotary_emb) has exactly
    the layer structure PackedDecoder.last_states computes."""
    cfg = decoder.config
    if cfg.model_type not in SUPPORTED_TYPES or not hasattr(decoder, "rotary_emb"):
        return False
    if getattr(decoder.rotary_emb, "rope_type", "default") not in STATIC_ROPE:  # e.g. dynamic: depends on length
        return False
    norms = [decoder.norm] + [n for ly in decoder.layers for n in (ly.input_layernorm, ly.post_attention_layernorm)]
    if not all(hasattr(n, "variance_epsilon") for n in norms):  # RMSNorm as _Norm computes it
        return False
    for layer in decoder.layers:
        attn = layer.self_attn
        if getattr(attn, "sliding_window", None) is not None or hasattr(attn, "q_norm"):
            return False
    return True


@dataclass
class Prefix:
    """The constant prompt prefix, computed once: per layer its keys and values after RoPE,
    (kv_heads, P, d) each, and the final state of its last token (H,) (the answer for a row with
    no tokens after the prefix); P = 0: no prefix."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    last: torch.Tensor | None

    @property
    def length(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0

    @classmethod
    def from_cache(cls, cache, last: torch.Tensor | None) -> "Prefix":
        """From an HF DynamicCache of one row (ItemLM.prefix_cache) and its last final state."""
        return cls([layer.keys[0] for layer in cache.layers], [layer.values[0] for layer in cache.layers], last)


def _pairs(n_out: int, d: int) -> torch.Tensor:
    """(n_out,) the output rows of a q or k projection of heads of size d, reordered so that the
    pairs RoPE rotates together, HF's (i, i + d/2) (rotate_half), sit side by side, (2i, 2i + 1):
    then a head is d/2 complex numbers and RoPE one complex product (_rope). Queries and keys
    reordered alike keep every q . k (values and outputs are not reordered)."""
    half = torch.arange(d // 2)
    within = torch.stack([half, half + d // 2], dim=1).reshape(-1)  # (d,) new slot -> HF's
    return (torch.arange(n_out // d)[:, None] * d + within).reshape(-1)


def _rotations(cos: torch.Tensor, sin: torch.Tensor):
    """RoPE's cos and sin (N, d/2) at N positions -> what _rope multiplies pairs by: e^(i angle)
    (N, 1, d/2) complex, or for dtypes without a complex type (half, bfloat16) (cos, cos) and
    (-sin, sin) interleaved, (N, 1, d) each."""
    if cos.dtype in (torch.float32, torch.float64):
        return torch.complex(cos, sin)[:, None]
    return cos.repeat_interleave(2, dim=-1)[:, None], torch.stack([-sin, sin], dim=-1).flatten(-2)[:, None]


def _rope(x: torch.Tensor, rot) -> torch.Tensor:
    """x (T, heads, d) with RoPE's pairs side by side (_pairs), rot (_rotations, T rows) -> RoPE
    applied: each pair (a, b) becomes (a cos - b sin, a sin + b cos), HF's x * cos +
    rotate_half(x) * sin (the same products; one complex product instead of ~5 small ops)."""
    T, heads, d = x.shape
    if not isinstance(rot, tuple):
        return torch.view_as_real(torch.view_as_complex(x.view(T, heads, d // 2, 2)) * rot).view(T, heads, d)
    cos, sin = rot
    return x * cos + x.view(T, heads, d // 2, 2).flip(3).view(T, heads, d) * sin  # (a, b) -> (b, a)


class _Norm:
    """An RMSNorm module as the packed forward applies it: x / sqrt(mean(x^2) + eps), in float32 as
    Llama/Qwen2 compute it, times the norm's weight; ``scaled=False`` leaves the weight to the
    projections that read the output (_Linear's ``scale``: (x * w) W = x (w W)), which a layer's
    two norms do: a batch-1 query runs four norms, and their small ops cost more than their
    arithmetic."""

    def __init__(self, norm, scaled: bool = True):
        self.w, self.eps, self.scaled = norm.weight, norm.variance_epsilon, scaled
        self._eps = torch.tensor(norm.variance_epsilon, dtype=torch.float32, device=norm.weight.device)  # addcmul's

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, H) -> (N, H)."""
        if x.dtype == torch.float32:  # 4 ops: mean(x^2) + eps as eps + |x|^2 / H in one addcmul
            v = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # (N, 1)
            h = x * torch.addcmul(self._eps, v, v, value=1 / x.shape[-1]).rsqrt_()
            return h.mul_(self.w) if self.scaled else h
        h = x.float()
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return self.w * h if self.scaled else h


@dataclass
class _Group:
    """Consecutive rows whose attention is laid out together, padded to the longest of them."""

    rows: slice  # of the B rows
    tokens: slice  # of the T packed tokens
    L: int  # the longest row's tokens
    flat: torch.Tensor  # (t,) each token's slot in the group's (rows, L) layout
    flat_p: torch.Tensor  # (t,) the same in (rows, P + L), after the prefix
    see: torch.Tensor  # (rows, 1, L, P + L) bool: which keys each query position may see
    see_last: torch.Tensor  # (rows, 1, 1, P + L) bool: the same for each row's last token
    dense: bool  # every row has L tokens: the packed tokens are the (rows, L) layout already

    def padded(self, x: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """x (t, heads, d) this group's packed tokens -> (rows, heads, [P +] L, d), zero where a
        row is shorter than L; ``prefix`` (P, heads, d) first when given."""
        n, P = self.rows.stop - self.rows.start, 0 if prefix is None else prefix.shape[0]
        if self.dense:
            out = x.view(n, self.L, *x.shape[1:])
            if P:
                out = torch.cat([prefix[None].expand(n, -1, -1, -1).to(x.dtype), out], dim=1)
            return out.transpose(1, 2)
        out = x.new_zeros(n, P + self.L, *x.shape[1:])  # (rows, P + L, heads, d)
        if P:
            out[:, :P] = prefix.to(x.dtype)
        out.view(n * (P + self.L), *x.shape[1:])[self.flat_p if P else self.flat] = x
        return out.transpose(1, 2)


@dataclass
class _Layout:
    """Where every token of a batch of rows goes: depends on the rows' lengths only."""

    groups: list[_Group]
    last: torch.Tensor  # (B',) each non-empty row's last token in the packing
    pos: torch.Tensor  # (T,) each token's position in its full prompt (after the prefix's P)


@functools.lru_cache(maxsize=256)  # batch 1 sees at most max_history layouts; small tensors each
def _layout(lengths: tuple[int, ...], P: int, dev: torch.device) -> _Layout:
    """Rows sorted by length, none empty, after a prefix of P tokens -> their layout; the rows are
    grouped so that each group keeps padding under a third of its slots: attention over (rows, L)
    costs rows x L^2, and one 50-item history must not pad 63 short ones to 50."""
    groups, a, start = [], 0, 0
    for b in range(1, len(lengths) + 1):
        if b < len(lengths) and (b + 1 - a) * lengths[b] <= 1.5 * (sum(lengths[a:b + 1])):
            continue
        n, L = lengths[a:b], lengths[b - 1]
        t = torch.tensor(n, device=dev)
        row = torch.repeat_interleave(torch.arange(b - a, device=dev), t)  # (tokens,)
        offs = torch.arange(int(t.sum()), device=dev) - (t.cumsum(0) - t)[row]
        kpos = torch.arange(L, device=dev)
        causal = kpos[None, :] <= kpos[:, None]  # (Lq, Lk) key j <= query i
        own = causal[None] & (kpos[None, None, :] < t[:, None, None])  # (rows, Lq, Lk) and j in the row
        see = torch.cat([own.new_ones(b - a, L, P), own], dim=2)[:, None]
        see_last = torch.cat([own.new_ones(b - a, P), kpos[None] < t[:, None]], dim=1)[:, None, None]
        groups.append(_Group(slice(a, b), slice(start, start + int(t.sum())), L, row * L + offs,
                             row * (P + L) + P + offs, see, see_last, dense=min(n) == L))
        a, start = b, start + int(t.sum())
    n = torch.tensor(lengths, device=dev)
    starts = n.cumsum(0) - n
    row = torch.repeat_interleave(torch.arange(len(lengths), device=dev), n)  # (T,)
    return _Layout(groups, starts + n - 1, P + torch.arange(int(n.sum()), device=dev) - starts[row])


def _additive(see: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool attention mask -> the additive one SDPA makes of it on every call (0 / -inf)."""
    return torch.zeros(see.shape, dtype=dtype, device=see.device).masked_fill_(~see, float("-inf"))


@dataclass
class _Plan:
    """What a batch of rows of the same lengths reuses on one decoder, in one dtype: the layout,
    RoPE's rotations at every token and at each row's last one, and each group's attention masks
    in the additive form SDPA would convert a bool mask to (at batch 1 each of these is a few
    small ops per call, and a query's matmuls take about half its time)."""

    layout: _Layout
    rot: object  # _rotations at every token (T rows)
    rot_last: object  # _rotations at each row's last token (B' rows)
    see: list[torch.Tensor]  # per group (rows, 1, L, P + L) additive
    see_last: list[torch.Tensor | None]  # per group (rows, 1, 1, P + L) additive; None: a dense group sees all
    last: slice | torch.Tensor  # each row's last token: a slice (a view, not a gather) for a single row
    one: bool  # a single dense group: its attention output is the packed tokens' already


class _Linear:
    """nn.Linear modules sharing an input, as ONE (in, sum of outs) contiguous weight."""

    def __init__(self, *mods, rows: dict | None = None, scale: torch.Tensor | None = None):
        """``rows``: module -> the order of its output rows (_pairs), else as they are; ``scale``
        (in,): the weight of the norm before them, applied to the input (_Norm's ``scaled``)."""
        rows = rows or {}

        def cut(t, m):  # a weight's or bias's rows, reordered where asked
            return t if m not in rows else t[rows[m]]

        self.w = torch.cat([cut(m.weight, m) for m in mods]).T.contiguous()  # (in, out)
        if scale is not None:
            self.w.mul_(scale.to(self.w.dtype)[:, None])
        biases = [m.bias for m in mods]
        self.b = None if all(b is None for b in biases) else \
            torch.cat([cut(b, m) if b is not None else m.weight.new_zeros(m.out_features)
                       for b, m in zip(biases, mods)])

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, in) -> (N, out) x W + b, plus ``residual`` (N, out) when given (in the same call
        without a bias: the sum of the residual stream is the same, up to float rounding)."""
        w = self.w if self.w.dtype == x.dtype else self.w.to(x.dtype)  # autocast
        if self.b is None:
            return x @ w if residual is None else torch.addmm(residual, x, w)
        y = torch.addmm(self.b.to(x.dtype), x, w)
        return y if residual is None else y.add_(residual)


def _silu_like(act) -> bool:
    """Whether an activation module is SiLU (torch's or transformers' SiLUActivation): called as
    F.silu it skips a module call per layer."""
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


class _Layer:
    def __init__(self, layer, last: bool):
        a, m = layer.self_attn, layer.mlp
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm  # their weights: in the projections after
        self.norm1, self.norm2 = _Norm(n1, scaled=False), _Norm(n2, scaled=False)
        self.act = F.silu if _silu_like(m.act_fn) else m.act_fn
        self.hd, self.scaling = a.head_dim, a.scaling
        self.nq, self.nk = a.q_proj.out_features, a.k_proj.out_features
        self.heads = self.nq // self.hd
        self.width = self.nq + a.k_proj.out_features + a.v_proj.out_features  # of projections()' rows
        # queries and keys with RoPE's pairs side by side (_pairs)
        rows = {a.q_proj: _pairs(self.nq, self.hd), a.k_proj: _pairs(self.nk, self.hd)}
        if last:  # queries at the last tokens only, keys/values everywhere
            self.q, self.kv = _Linear(a.q_proj, rows=rows, scale=n1.weight), \
                _Linear(a.k_proj, a.v_proj, rows=rows, scale=n1.weight)
        else:
            self.qkv = _Linear(a.q_proj, a.k_proj, a.v_proj, rows=rows, scale=n1.weight)
        self.o = _Linear(a.o_proj)
        self.gate_up, self.down = _Linear(m.gate_proj, m.up_proj, scale=n2.weight), _Linear(m.down_proj)
        self.inter = m.gate_proj.out_features

    def projections(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, H) the layer's input -> (N, Q + 2 KV) its queries, keys (RoPE's pairs side by side:
        _pairs) and values before RoPE."""
        h = self.norm1(x)
        return self.qkv(h) if hasattr(self, "qkv") else torch.cat([self.q(h), self.kv(h)], dim=1)

    def mlp(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """x (N, H) normed -> residual + the MLP's output."""
        g = self.gate_up(x)  # (N, 2 * inter)
        return self.down(self.act(g[:, :self.inter]).mul_(g[:, self.inter:]), residual)  # act(gate) * up, one buffer


class PackedDecoder:
    """The decoder's layers as the packed forward reads them, and the prompt prefix's keys and
    values: build once per weights, then ``last_states`` per batch."""

    PLANS = 256  # batch plans kept (_plan): batch 1 sees at most max_history of them

    def __init__(self, decoder, prefix: Prefix):
        if not supported(decoder):
            raise ValueError(f"{decoder.config.model_type} layers are not the ones the packed forward computes")
        n = len(decoder.layers)
        self.layers = [_Layer(layer, i == n - 1) for i, layer in enumerate(decoder.layers)]
        self.norm, self.rotary = _Norm(decoder.norm), decoder.rotary_emb
        self.prefix = prefix
        # per layer the prefix's keys and values as (P, kv, d), the packed tokens' layout (keys: _pairs)
        self._prefix_kv = [(k.transpose(0, 1)[..., _pairs(k.shape[-1], k.shape[-1])].contiguous(),
                            v.transpose(0, 1).contiguous()) for k, v in zip(prefix.keys, prefix.values)]
        self._rot: tuple[torch.Tensor, torch.Tensor] | None = None
        self._plans: dict[tuple, _Plan] = {}

    def _rotation(self, pos: torch.Tensor, need: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's cos and sin (T, d/2) at positions ``pos`` (T,), one per pair (i, i + d/2), from a
        table of the positions seen so far (the rotary module's own values: a position's rotation
        does not depend on the rest); ``need``: 1 + the largest position."""
        if self._rot is None or self._rot[0].shape[0] < need or self._rot[0].dtype != dtype:
            n = max(need, 2 * (0 if self._rot is None else self._rot[0].shape[0]), 64)
            at = torch.arange(n, device=pos.device)[None]
            cos, sin = self.rotary(torch.zeros(1, dtype=dtype, device=pos.device), at)  # (1, n, d)
            half = cos.shape[-1] // 2
            if not (torch.equal(cos[..., :half], cos[..., half:]) and torch.equal(sin[..., :half], sin[..., half:])):
                raise ValueError("RoPE's angles differ between a pair's two halves: not the rotation _rope applies")
            self._rot = cos[0, :, :half], sin[0, :, :half]
        return self._rot[0][pos], self._rot[1][pos]

    def _plan(self, lengths: tuple[int, ...], dtype: torch.dtype, dev: torch.device) -> _Plan:
        """The plan of a batch of non-empty rows of these lengths (sorted), computed once."""
        key = (lengths, dtype, dev)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        P = self.prefix.length
        lay = _layout(lengths, P, dev)
        cos, sin = self._rotation(lay.pos, P + max(lengths), dtype)  # (T, d/2) each
        g = lay.groups
        plan = _Plan(lay, _rotations(cos, sin), _rotations(cos[lay.last], sin[lay.last]),
                     [_additive(x.see, dtype) for x in g],
                     [None if x.dense else _additive(x.see_last, dtype) for x in g],
                     slice(len(lay.pos) - 1, len(lay.pos)) if len(lengths) == 1 else lay.last,
                     one=len(g) == 1 and g[0].dense)
        if len(self._plans) >= self.PLANS:
            self._plans.clear()
        self._plans[key] = plan
        return plan

    @property
    def first_width(self) -> int:
        """Q + 2 KV: the width of first_projections' rows."""
        return self.layers[0].width

    def first_projections(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, H) input vectors (a vocabulary's) -> (N, Q + 2 KV) what the first layer projects
        each to before RoPE: pass the rows of a batch's tokens to ``last_states`` as ``first``."""
        return self.layers[0].projections(x)

    def last_states(self, x: torch.Tensor, lengths: list[int], first: torch.Tensor | None = None) -> torch.Tensor:
        """x (T, H) the embedded tokens after the prefix of B rows, packed row after row, the rows
        sorted by length (shortest first); lengths (B,) tokens per row (sum T) -> (B, H) each
        row's last token's final state, as the HF forward gives it on the full prompt (prefix +
        row). A row with no tokens (the prefix alone) gets the prefix's last state. ``first``
        (T, Q + 2 KV): first_projections(x), when the caller has them from a table."""
        prefix, P = self.prefix, self.prefix.length
        B, T = len(lengths), x.shape[0]
        if list(lengths) != sorted(lengths):
            raise ValueError("packed rows must be sorted by length")
        empty = sum(1 for n in lengths if n == 0)  # first, sorted
        if empty == B:
            return prefix.last.to(x.dtype).expand(B, -1).clone()
        plan = self._plan(tuple(lengths[empty:]), x.dtype, x.device)
        groups, last, rot = plan.layout.groups, plan.last, plan.rot
        for i, ly in enumerate(self.layers):
            final = ly is self.layers[-1]
            given = first if i == 0 and first is not None else None  # (T, Q + 2 KV)
            h = ly.norm1(x) if given is None else None  # (T, H)
            pk, pv = self._prefix_kv[i] if P else (None, None)  # (P, kv, d)
            if final:
                q, kv = None, ly.kv(h) if given is None else given[:, ly.nq:]  # (T, 2 KV)
                k, v = kv.view(T, 2, -1, ly.hd).unbind(1)  # (T, kv, d) each
                k = _rope(k, rot)
            else:
                qkv = ly.qkv(h) if given is None else given  # (T, Q + 2 KV)
                qk = _rope(qkv[:, :ly.nq + ly.nk].view(T, -1, ly.hd), rot)  # (T, heads + kv, d): one RoPE
                q, k = qk[:, :ly.heads], qk[:, ly.heads:]
                v = qkv[:, ly.nq + ly.nk:].view(T, -1, ly.hd)  # (T, kv, d)
            if not final:
                if plan.one:  # one dense group: its (rows * L) positions are the packed tokens
                    g = groups[0]
                    o = F.scaled_dot_product_attention(g.padded(q), g.padded(k, pk), g.padded(v, pv),
                                                       attn_mask=plan.see[0], scale=ly.scaling, enable_gqa=True)
                    o = o.transpose(1, 2).reshape(T, ly.nq)  # (rows, heads, L, d) -> (T, Q)
                else:
                    o = q.new_empty(T, ly.nq)  # (T, heads * d)
                    for g, see in zip(groups, plan.see):
                        t = g.tokens
                        og = F.scaled_dot_product_attention(g.padded(q[t]), g.padded(k[t], pk), g.padded(v[t], pv),
                                                            attn_mask=see, scale=ly.scaling, enable_gqa=True)
                        og = og.transpose(1, 2).reshape(-1, ly.nq)  # (rows, heads, L, d) -> (rows * L, Q)
                        o[t] = og if g.dense else og[g.flat]
                x = ly.o(o, x)  # (T, H) x + attention
                x = ly.mlp(ly.norm2(x), x)
                continue
            # the last layer: only each row's last token goes on
            ql = ly.q(h[last]) if given is None else given[last, :ly.nq]  # (B', Q)
            ql = _rope(ql.view(-1, ly.heads, ly.hd), plan.rot_last)  # (B', heads, d)
            o = ql.new_empty(ql.shape[0], ly.nq) if len(groups) > 1 else None
            for g, see in zip(groups, plan.see_last):
                og = F.scaled_dot_product_attention(ql[g.rows, :, None], g.padded(k[g.tokens], pk),
                                                    g.padded(v[g.tokens], pv), attn_mask=see,
                                                    scale=ly.scaling, enable_gqa=True)  # (rows, heads, 1, d)
                if o is None:
                    o = og.reshape(-1, ly.nq)
                else:
                    o[g.rows] = og.reshape(-1, ly.nq)
            y = ly.o(o, x[last])  # (B', H)
            y = self.norm(ly.mlp(ly.norm2(y), y))
            if not empty:
                return y
            return torch.cat([prefix.last.to(y.dtype).expand(empty, -1), y])
        raise ValueError("the decoder has no layers")
