#!/usr/bin/env python3
"""Two-micro-batch decode layer: one micro-batch's attention runs while the other's tokens fly.

    python experiments/decode_overlap.py --world-size 4 --out experiments/results

Each micro-batch (128 tokens per GPU by default) runs an MLA-like attention split in two parts
(part 1: q/kv down- and up-projections and a memory-bound attention core over a KV cache;
part 2: per-head value up-projection and the output projection), then a low-latency dispatch,
the experts (identity here: the study is about communication) and a combine. Steady state per
layer, on one stream, every flight covered by the other micro-batch's compute:

    A.part1 | dB flies ; hook dB, send cB ; A.part2 | cB flies ; hook cB, send dA ;
    B.part1 | dA flies ; hook dA, send cA ; B.part2 | cA flies ; hook cA, send dB (next layer)

Three schedules are timed under CUDA-graph replay (per-layer time = replay / layers):
`compute_only` (no communication), `sequential` (every transfer waited for at once) and
`overlapped` (above), for each transport. `sms_during_flight` = SMs our communication holds
while data is in flight (0 for copy engines). Writes decode_overlap_ws{N}.json.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from overlap.bench import make_meta, time_graph_replay, write_results  # noqa: E402
from overlap.testing import run_distributed  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TRANSPORTS = ("copy_engine", "sm", "nccl")


class MLALikeAttention:
    """DeepSeek-V3-sized projections for decode (weights random, bf16); no real softmax semantics needed."""

    def __init__(self, hidden, heads, ctx, tokens, device, q_lora=1536, kv_lora=512, rope=64, nope=128, v_dim=128):
        g = torch.Generator(device="cpu").manual_seed(7)

        def p(*shape):
            return (torch.randn(*shape, generator=g) / shape[-2] ** 0.5).to(device, torch.bfloat16)

        self.heads, self.kv_dim, self.kv_lora = heads, kv_lora + rope, kv_lora
        self.wq_a, self.wq_b = p(hidden, q_lora), p(q_lora, heads * (nope + rope))
        self.wkv_a = p(hidden, kv_lora + rope)
        self.w_qabs = p(heads, nope + rope, kv_lora + rope)     # absorbed q -> latent
        self.w_vup = p(heads, kv_lora, v_dim)
        self.wo = p(heads * v_dim, hidden)
        # One latent KV cache per token (decode: each token attends over its own context).
        self.cache = (torch.randn(tokens, ctx, kv_lora + rope, generator=g) * 0.1).to(device, torch.bfloat16)

    def part1(self, x):
        T = x.shape[0]
        q = ((x @ self.wq_a) @ self.wq_b).view(T, self.heads, -1)
        _ = x @ self.wkv_a  # the new token's latent (would be appended to the cache)
        q_lat = torch.einsum("thd,hdk->thk", q, self.w_qabs)                 # [T, H, 576]
        scores = torch.bmm(q_lat, self.cache.transpose(1, 2)) * 0.04         # [T, H, ctx]
        probs = torch.softmax(scores.float(), dim=-1).to(torch.bfloat16)
        return torch.bmm(probs, self.cache[:, :, :self.kv_lora])             # [T, H, 512]

    def part2(self, o_lat):
        T = o_lat.shape[0]
        v = torch.einsum("thk,hkv->thv", o_lat, self.w_vup).reshape(T, -1)
        return v @ self.wo                                                    # [T, hidden]


def _rank(rank, world_size, args):
    from overlap.ep import EPBuffer
    from overlap.ep.low_latency import low_latency_state

    dev = torch.device("cuda", torch.cuda.current_device())
    T, H, E, K = args.tokens, args.hidden, args.experts, args.topk
    buf = EPBuffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, backend="torch", validate_values=False,
                   device=dev)
    ll = low_latency_state(buf)
    attn = MLALikeAttention(H, args.heads, args.ctx, T, dev)
    gen = torch.Generator(device="cpu").manual_seed(10 + rank)
    mb = {}
    for name in "AB":
        idx = torch.rand(T, E, generator=gen).topk(K, dim=1).indices.to(dev)
        w = torch.softmax(torch.randn(T, K, generator=gen), dim=1).to(dev)
        mb[name] = {"x": (torch.randn(T, H, generator=gen) * 0.5).to(dev, torch.bfloat16), "idx": idx, "w": w}

    def compute_only():
        xa, xb = mb["A"]["x"], mb["B"]["x"]
        for _ in range(args.layers):
            xa = attn.part2(attn.part1(xa))
            xb = attn.part2(attn.part1(xb))
        return xa, xb

    def moe(name, x, transport, hooked):
        """dispatch -> identity experts -> combine; hooked=True waits for every transfer at once."""
        m = mb[name]
        recv, _, handle, hook = ll.dispatch(x, m["idx"], m["w"], return_recv_hook=not hooked, transport=transport)
        hook()
        out, chook = ll.combine(recv, None, None, handle, return_recv_hook=not hooked)
        chook()
        return out

    def sequential(transport):
        xa, xb = mb["A"]["x"], mb["B"]["x"]
        for _ in range(args.layers):
            xa = moe("A", attn.part2(attn.part1(xa)), transport, True)
            xb = moe("B", attn.part2(attn.part1(xb)), transport, True)
        return xa, xb

    def overlapped(transport):
        A, B = mb["A"], mb["B"]
        # Prologue: B's first attention and dispatch (exposed once per replay, not per layer).
        xb_att = attn.part2(attn.part1(B["x"]))
        rb, _, hb, hook_db = ll.dispatch(xb_att, B["idx"], B["w"], return_recv_hook=True, transport=transport)
        xa = A["x"]
        for layer in range(args.layers):
            a1 = attn.part1(xa)                                        # dB flies
            hook_db()
            xb, hook_cb = ll.combine(rb, None, None, hb, return_recv_hook=True)
            xa_att = attn.part2(a1)                                    # cB flies
            hook_cb()
            ra, _, ha, hook_da = ll.dispatch(xa_att, A["idx"], A["w"], return_recv_hook=True, transport=transport)
            b1 = attn.part1(xb)                                        # dA flies
            hook_da()
            xa, hook_ca = ll.combine(ra, None, None, ha, return_recv_hook=True)
            xb_att = attn.part2(b1)                                    # cA flies
            hook_ca()
            if layer + 1 < args.layers:
                rb, _, hb, hook_db = ll.dispatch(xb_att, B["idx"], B["w"], return_recv_hook=True, transport=transport)
        return xa, xb_att

    def reduce_max(v):
        t = torch.tensor([float(v)], dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    timed = [("compute_only", None, compute_only)]
    for transport in args.transports:
        timed.append(("sequential", transport, lambda tr=transport: sequential(tr)))
        timed.append(("overlapped", transport, lambda tr=transport: overlapped(tr)))
    pack_blocks = max(1, min((T * ((H + 1023) // 1024) + 3) // 4, 1024))
    sm_count = torch.cuda.get_device_properties(dev).multi_processor_count
    rows, base = [], None
    for schedule, transport, fn in timed:
        try:
            t = time_graph_replay(fn, warmup=args.warmup, iters=args.iters, replays_per_sample=2)
        except Exception as exc:  # e.g. a NCCL build that cannot be captured (nccl runs last)
            if transport != "nccl" or transport != args.transports[-1]:
                raise
            print(f"[decode_overlap] rank {rank}: {schedule}/{transport} failed: {exc}", flush=True)
            rows.append({"op": "error", "schedule": schedule, "transport": transport, "error": str(exc)[:200],
                         "world_size": world_size})
            break
        per_layer = reduce_max(t["time_us"]) / args.layers
        if schedule == "compute_only":
            base = per_layer
        sms = None if transport is None else {"copy_engine": 0, "sm": min(pack_blocks, sm_count), "nccl": None}[transport]
        rows.append({"op": "decode_layer", "schedule": schedule, "backend": f"ll_{transport}" if transport else "none",
                     "transport": transport, "num_sms": sms, "sms_during_flight": sms, "num_tokens": T,
                     "micro_batches": 2, "hidden": H, "topk": K, "num_experts": E, "dtype": "bf16",
                     "layers": args.layers, "time_us": per_layer, "ratio_to_compute_only": per_layer / base,
                     "timing": "cuda_graph_replay", "world_size": world_size})
    ll.check_status()
    return rows if rank == 0 else None


def main(argv=None):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=gpus or 2)
    p.add_argument("--tokens", type=int, default=128, help="tokens per micro-batch per rank")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--heads", type=int, default=128)
    p.add_argument("--ctx", type=int, default=1024, help="KV-cache length each token attends over")
    p.add_argument("--layers", type=int, default=4, help="layers per graph replay")
    p.add_argument("--transports", nargs="*", default=list(TRANSPORTS), choices=TRANSPORTS)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=RESULTS_DIR)
    args = p.parse_args(argv)
    if gpus < args.world_size:
        p.error(f"--world-size {args.world_size} needs {args.world_size} GPUs; this machine has {gpus}")
    rows = run_distributed(_rank, args.world_size, args, backend="nccl", timeout_s=900)[0]
    print(f"\n{'schedule':<14}{'transport':<13}{'SMs in flight':>14}{'us/layer':>10}{'x compute':>11}")
    for r in rows:
        if r["op"] == "error":
            print(f"{r['schedule']:<14}{r['transport']:<13} failed: {r['error']}")
            continue
        sms = "-" if r["sms_during_flight"] is None else r["sms_during_flight"]
        print(f"{r['schedule']:<14}{str(r['transport'] or '-'):<13}{sms:>14}{r['time_us']:>10.1f}"
              f"{r['ratio_to_compute_only']:>11.3f}")
    command = "python experiments/decode_overlap.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = make_meta("decode_overlap", args.world_size, command=command, tokens_per_micro_batch=args.tokens,
                     ctx=args.ctx, heads=args.heads, experts_compute="identity")
    path = os.path.join(args.out, f"decode_overlap_ws{args.world_size}.json")
    write_results(path, meta, rows)
    print(f"[decode_overlap] wrote {path}")
    return rows


if __name__ == "__main__":
    main()
