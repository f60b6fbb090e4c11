"""The CPU paged attention against plain per-sequence attention: dense decode rows (DecodeKV) and the block
gather, over several steps in which sequences grow, leave, join and come back after a preemption."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from lmkit.pytorch_engine.kernels import attention_cpu, decode_kv_cpu
from lmkit.pytorch_engine.kernels.decode_kv_cpu import DecodeKV, tiled_attention
from lmkit.pytorch_engine.kernels.metadata import AttentionMetadata
from lmkit.pytorch_engine.models import linear

KVH, GROUP, D, BS, LAYERS = 2, 3, 16, 4, 2


@dataclass(eq=False)
class Seq:
    block_table: list[int]
    num_computed_tokens: int = 0
    # per layer: the reference keys and values of every position, fp32
    ks: list[list[torch.Tensor]] = field(default_factory=lambda: [[] for _ in range(LAYERS)])
    vs: list[list[torch.Tensor]] = field(default_factory=lambda: [[] for _ in range(LAYERS)])


class Harness:
    def __init__(self, dtype: torch.dtype, window: int | None, max_bytes: int = 1 << 30):
        self.dtype, self.window = dtype, window
        self.pools = [
            (
                attention_cpu.allocate_kv_cache(256, BS, KVH, D, dtype, "cpu"),
                attention_cpu.allocate_kv_cache(256, BS, KVH, D, dtype, "cpu"),
            )
            for _ in range(LAYERS)
        ]
        self.dkv = DecodeKV(self.pools, BS, max_bytes)
        self.free = list(range(256))
        self.g = torch.Generator().manual_seed(0)

    def rand(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g).to(self.dtype)

    def new_seq(self, prompt_len: int) -> Seq:
        seq = Seq(block_table=[self.free.pop(self.free.index(b)) for b in self.free[5:8]])
        seq.block_table += [self.free.pop() for _ in range(13)]  # not contiguous: blocks come from both ends
        self.prefill(seq, prompt_len)
        return seq

    def prefill(self, seq: Seq, n: int) -> None:
        """n more tokens' keys and values, straight into the pool."""
        for _ in range(n):
            self._store(seq)
            seq.num_computed_tokens += 1

    def _store(self, seq: Seq) -> None:
        """New random k, v for every layer at the sequence's next position, into the pool and the reference."""
        p = seq.num_computed_tokens
        slot = torch.tensor([seq.block_table[p // BS] * BS + p % BS])
        for layer, (kc, vc) in enumerate(self.pools):
            k, v = self.rand(KVH, D), self.rand(KVH, D)
            attention_cpu.write_kv(k[None], v[None], kc, vc, slot)
            seq.ks[layer][p:] = [k.float()]
            seq.vs[layer][p:] = [v.float()]

    def step(self, seqs: list[Seq], use_rows: bool) -> None:
        """One decode step for `seqs`: write each new token's k/v, attend, compare with the reference."""
        order = list(range(len(seqs)))
        meta = AttentionMetadata(slot_mapping=None, num_decode=len(seqs), sliding_window=self.window or 0)
        if use_rows:
            order = self.dkv.prepare(seqs, self.window)
            assert order is not None
            meta.decode_window = self.dkv
        seqs = [seqs[i] for i in order]
        if not use_rows:
            self._gather_meta(meta, seqs)
        q = self.rand(len(seqs), KVH * GROUP, D)
        for s in seqs:
            self._store(s)
        for layer, (kc, vc) in enumerate(self.pools):
            k_step = torch.stack([s.ks[layer][s.num_computed_tokens] for s in seqs]).to(self.dtype)
            v_step = torch.stack([s.vs[layer][s.num_computed_tokens] for s in seqs]).to(self.dtype)
            out = attention_cpu.paged_attention(q, k_step, v_step, kc, vc, meta, D**-0.5)
            ref = torch.stack([self._reference(q[i].float(), s, layer) for i, s in enumerate(seqs)])
            tol = 1e-5 if self.dtype == torch.float32 else 3e-2
            torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
        for s in seqs:
            s.num_computed_tokens += 1

    def _gather_meta(self, meta: AttentionMetadata, seqs: list[Seq]) -> None:
        """What ModelRunner._decode_context builds for the block-gather path."""
        lens = [s.num_computed_tokens + 1 for s in seqs]
        nb = -(-max(lens) // BS)
        meta.decode_block_tables = torch.tensor([(s.block_table + s.block_table[:1] * nb)[:nb] for s in seqs])
        meta.decode_ctx_len = nb * BS
        pos = torch.arange(nb * BS)
        last = torch.tensor(lens)[:, None] - 1
        mask = pos[None, :] <= last
        if self.window:
            mask &= pos[None, :] > last - self.window
        bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
        meta.decode_bias = bias[:, None, None, :]

    def _reference(self, q: torch.Tensor, seq: Seq, layer: int) -> torch.Tensor:
        p = seq.num_computed_tokens
        lo = max(0, p + 1 - self.window) if self.window else 0
        k = torch.stack(seq.ks[layer][lo : p + 1]).repeat_interleave(GROUP, dim=1)  # [ctx, H, D]
        v = torch.stack(seq.vs[layer][lo : p + 1]).repeat_interleave(GROUP, dim=1)
        probs = torch.softmax(torch.einsum("hd,chd->hc", q, k) * D**-0.5, dim=-1)
        return torch.einsum("hc,chd->hd", probs, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("layout", ["tiled keys", "plain keys", "paged pool"])
def test_decode_matches_reference_as_batches_change(dtype, window, layout, monkeypatch):
    if layout == "plain keys":
        monkeypatch.setattr(decode_kv_cpu, "TILED_ROWS", 0)
    use_rows = layout != "paged pool"
    h = Harness(dtype, window)
    a, b, c = h.new_seq(5), h.new_seq(1), h.new_seq(9)
    for _ in range(3):  # rows grow past a block boundary
        h.step([a, b, c], use_rows)
    h.step([c, a], use_rows)  # b leaves: the last row moves into its place
    d = h.new_seq(3)
    h.step([a, d, c], use_rows)  # d joins: its row is filled from the pool
    # b comes back after a preemption: recomputed (new values) and longer than when it left
    b.num_computed_tokens = 0
    h.prefill(b, 7)
    for _ in range(40):  # long enough to grow the rows' capacity twice
        h.step([d, b, a, c], use_rows)
    if use_rows:
        assert h.dkv.capacity >= max(s.num_computed_tokens for s in (a, b, c, d))
        assert h.dkv.tiled == (layout == "tiled keys")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_outgrow_tiled_keys(dtype, monkeypatch):
    """A batch that grows past TILED_ROWS rows turns the tiled keys it holds into plain ones."""
    monkeypatch.setattr(decode_kv_cpu, "TILED_ROWS", 8)
    h = Harness(dtype, None)
    seqs = [h.new_seq(3 + i) for i in range(8)]
    for _ in range(2):
        h.step(seqs, use_rows=True)
    assert h.dkv.tiled
    seqs.append(h.new_seq(30))
    for _ in range(2):
        h.step(seqs, use_rows=True)
    assert not h.dkv.tiled


def test_rows_refuse_a_batch_over_budget():
    h = Harness(torch.float32, None, max_bytes=2 * LAYERS * 8 * KVH * 64 * D * 4)  # 8 rows of 64 tokens
    seqs = [h.new_seq(3) for _ in range(2)]
    assert h.dkv.prepare(seqs) is not None
    assert h.dkv.capacity == 64  # the least: two tiles of keys
    long = Seq(block_table=[h.free.pop() for _ in range(24)])
    h.prefill(long, 70)
    assert h.dkv.prepare(seqs + [long]) is None  # 96 tokens of capacity would not fit
    assert h.dkv.seqs == [] and h.dkv.k == []  # cleared: the runner reads the paged pool this step
    h.step(seqs + [long], use_rows=False)


def test_padded_table():
    from lmkit.pytorch_engine.kernels.metadata import padded_table

    table = padded_table([[3, 1], [], [7, 8, 9]], width=4, num_rows=5)
    assert table.dtype == torch.int32
    assert table.tolist() == [[3, 1, 0, 0], [0, 0, 0, 0], [7, 8, 9, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert padded_table([[5]], width=1).tolist() == [[5]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_forms_of_the_tiled_attention_match_plain_attention(dtype):
    """The decode rows' attention as traced for Inductor (products and sums) and as run eagerly (matmuls)."""
    g = torch.Generator().manual_seed(0)
    n, kvh, group, d, tile, tiles = 3, 2, 3, 16, 32, 2
    q = torch.randn(n, kvh, group, d, generator=g).to(dtype)
    k, v = (torch.randn(n, kvh, tiles * tile, d, generator=g).to(dtype) for _ in range(2))
    k_tiles = k.view(n, kvh, tiles, tile, d).transpose(-1, -2).contiguous()
    bias = attention_cpu.visibility_bias(torch.tensor([5, 64, 40]), tiles * tile, None)
    ref = attention_cpu.attend(q.float(), k.float(), v.float(), 0.25, bias)
    eager = tiled_attention(q, k_tiles, v, 0.25, bias)
    with linear.traced():
        traced_form = tiled_attention(q, k_tiles, v, 0.25, bias)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for out in (eager, traced_form):
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
