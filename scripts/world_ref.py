#!/usr/bin/env python3
"""The world model's forward pass in PyTorch (../shared/specs/world-checkpoint.md), the GPU
check's peer and third parity reference (scripts/gpu-check.sh). Needs only torch: safetensors
files are read and written by hand.

  world_ref.py parity MODEL DUMP [DUMP...]   max relative error of each `tofy bench-world --dump`
                                             file's vectors against this forward (float64 on CPU)
  world_ref.py compare DUMP_A DUMP_B         max relative error between two dumps
  world_ref.py bench MODEL --batch 1,32      latency on the GPU, eager and CUDA-graphed, timed as
                                             tofy bench-world times itself (ids in, vectors out)
  world_ref.py random OUT --dim 368 ...      a random checkpoint of the seed's size

Every result is one JSON line on stdout. The relative error of a vector is max|a - b| / max|b|,
the largest over the vectors reported (as tests/common's max_relative_error).
"""

import argparse
import json
import math
import statistics
import struct
import sys
import time

import torch
import torch.nn.functional as F

LN_EPS = 1e-5


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", {}) or {}
    body = memoryview(data)[8 + n :]
    tensors = {}
    for name, info in header.items():
        if info["dtype"] != "F32":
            sys.exit(f"{path}: tensor {name} is {info['dtype']}, expected F32")
        start, end = info["data_offsets"]
        values = torch.frombuffer(bytearray(body[start:end]), dtype=torch.float32)
        tensors[name] = values.reshape(info["shape"])
    return tensors, meta


def write_safetensors(path, tensors, meta):
    header, offset, blobs = {"__metadata__": meta}, 0, []
    for name, t in tensors.items():
        blob = t.contiguous().to(torch.float32).numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for blob in blobs:
            f.write(blob)


class World:
    """The weights on one device and dtype, and the forward pass over padded id batches."""

    def __init__(self, path, heads=None, max_seq=None, device="cpu", dtype=torch.float32):
        w, meta = read_safetensors(path)
        self.w = {k: v.to(device=device, dtype=dtype) for k, v in w.items()}
        self.dim = self.w["encoder.embed.weight"].shape[1]
        self.layers = sum(1 for k in w if k.endswith(".attn.q_proj.weight"))
        self.heads = int(heads or meta.get("num_heads", 8))
        self.max_seq = int(max_seq or meta.get("max_seq", 128))
        self.device, self.dtype = device, dtype
        pos = torch.arange(self.max_seq, dtype=torch.float64)[:, None]
        even = (torch.arange(self.dim) // 2 * 2).to(torch.float64)
        angle = pos / torch.pow(torch.tensor(10000.0, dtype=torch.float64), even / self.dim)
        pe = torch.where(torch.arange(self.dim) % 2 == 0, torch.sin(angle), torch.cos(angle))
        self.pe = pe.to(torch.float32).to(device=device, dtype=dtype)

    def linear(self, x, name):
        return F.linear(x, self.w[name + ".weight"], self.w[name + ".bias"])

    def norm(self, x, name):
        return F.layer_norm(x, (self.dim,), self.w[name + ".weight"], self.w[name + ".bias"], LN_EPS)

    def forward(self, ids, lens):
        """ids [B, max_seq] (padded with 0), lens [B] -> state, next, conditioning."""
        b, s, d, h = ids.shape[0], self.max_seq, self.dim, self.heads
        x = self.w["encoder.embed.weight"][ids] + self.pe
        for i in range(self.layers):
            p = f"encoder.block_{i}"
            y = self.norm(x, f"{p}.ln1")
            q, k, v = (
                self.linear(y, f"{p}.attn.{n}_proj").view(b, s, h, d // h).transpose(1, 2)
                for n in ("q", "k", "v")
            )
            # No mask: the models attend over padding (spec, step 1).
            att = F.scaled_dot_product_attention(q, k, v)
            x = x + self.linear(att.transpose(1, 2).reshape(b, s, d), f"{p}.attn.out_proj")
            y = F.gelu(self.linear(self.norm(x, f"{p}.ln2"), f"{p}.ff1"), approximate="tanh")
            x = x + self.linear(y, f"{p}.ff2")
        x = self.norm(x, "encoder.ln_final")
        real = (torch.arange(s, device=ids.device)[None, :] < lens[:, None]).to(x.dtype)
        state = (x * real[:, :, None]).sum(1) / lens[:, None].to(x.dtype)
        action = self.w["world_transition.action_embed.weight"][0].expand(b, -1)
        hidden = F.relu(self.linear(torch.cat([state, action], 1), "world_transition.fc1"))
        nxt = self.linear(hidden, "world_transition.fc2")
        return state, nxt, self.linear(nxt, "decoder_bridge.proj")

    def batch(self, id_lists):
        ids = torch.zeros(len(id_lists), self.max_seq, dtype=torch.long)
        for row, seq in zip(ids, id_lists):
            row[: len(seq)] = torch.tensor(seq)
        return ids, torch.tensor([len(seq) for seq in id_lists])


def rel_err(got, want):
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    return ((got - want).abs().max(-1).values / want.abs().max(-1).values.clamp_min(1e-30)).max().item()


def parity(args):
    # The reference: float64 on the CPU, so that its own rounding does not count.
    ref = World(args.model, args.heads, args.max_seq, "cpu", torch.float64)
    for path in args.dumps:
        dump = json.load(open(path))
        for run in dump["runs"]:
            prompts = run["prompts"]
            ids, lens = ref.batch([p["ids"] for p in prompts])
            with torch.no_grad():
                state, nxt, cond = ref.forward(ids, lens)
            print(json.dumps({
                "check": "parity vs PyTorch float64", "dump": path, "device": dump["device"],
                "batch": run["batch"], "prompts": len(prompts),
                "conditioning": rel_err([p["conditioning"] for p in prompts], cond),
                "state": rel_err([p["state"] for p in prompts], state),
                "next": rel_err([p["next"] for p in prompts], nxt),
            }))


def compare(args):
    a, b = json.load(open(args.a)), json.load(open(args.b))
    want = {r["batch"]: r["prompts"] for r in b["runs"]}
    for run in a["runs"]:
        other = want[run["batch"]]
        assert [p["ids"] for p in run["prompts"]] == [p["ids"] for p in other], "different prompts"
        print(json.dumps({
            "check": f"{a['device']} vs {b['device']}", "batch": run["batch"],
            **{k: rel_err([p[k] for p in run["prompts"]], [p[k] for p in other])
               for k in ("conditioning", "state", "next")},
        }))


def bench(args):
    dev = torch.device("cuda")
    world = World(args.model, args.heads, args.max_seq, dev)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 GEMMs, as tofy's cuBLAS calls
    gen = torch.Generator().manual_seed(0)
    vocab = world.w["encoder.embed.weight"].shape[0]
    for b in args.batch:
        lens = torch.randint(1, world.max_seq + 1, (b,), generator=gen)
        ids = torch.randint(3, vocab, (b, world.max_seq), generator=gen)
        ids[torch.arange(world.max_seq)[None, :] >= lens[:, None]] = 0
        ids, lens = ids.pin_memory(), lens.pin_memory()

        def eager():
            with torch.no_grad():
                out = world.forward(ids.to(dev, non_blocking=True), lens.to(dev, non_blocking=True))
            return [t.cpu() for t in out]

        static_ids, static_lens = ids.to(dev), lens.to(dev)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):
                world.forward(static_ids, static_lens)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            static_out = world.forward(static_ids, static_lens)

        def graphed():
            static_ids.copy_(ids, non_blocking=True)
            static_lens.copy_(lens, non_blocking=True)
            graph.replay()
            return [t.cpu() for t in static_out]

        for mode, step in (("eager", eager), ("cuda-graph", graphed)):
            for _ in range(10):
                step()
            ms = []
            for _ in range(args.iters):
                start = time.perf_counter()
                step()
                ms.append((time.perf_counter() - start) * 1e3)
            ms.sort()
            print(json.dumps({
                "peer": f"pytorch {torch.__version__} {mode}", "device": torch.cuda.get_device_name(),
                "batch": b, "iters": args.iters, "median_ms": statistics.median(ms),
                "p10_ms": ms[len(ms) // 10], "p90_ms": ms[len(ms) * 9 // 10],
            }))


def random_checkpoint(args):
    d, b = args.dim, args.bridge_dim
    a, hidden, ff = max(d // 4, 32), max(3 * d // 2, 128), 4 * d
    gen = torch.Generator().manual_seed(args.seed)

    def rand(*shape, scale):
        return (torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1).mul(scale).float()

    t = {"encoder.embed.weight": rand(args.vocab_size, d, scale=1.0)}
    for i in range(args.layers):
        p = f"encoder.block_{i}"
        for n in ("q", "k", "v", "out"):
            t[f"{p}.attn.{n}_proj.weight"] = rand(d, d, scale=1 / math.sqrt(d))
            t[f"{p}.attn.{n}_proj.bias"] = rand(d, scale=0.1)
        for n in ("ln1", "ln2"):
            t[f"{p}.{n}.weight"] = 1 + rand(d, scale=0.1)
            t[f"{p}.{n}.bias"] = rand(d, scale=0.1)
        t[f"{p}.ff1.weight"], t[f"{p}.ff1.bias"] = rand(ff, d, scale=1 / math.sqrt(d)), rand(ff, scale=0.1)
        t[f"{p}.ff2.weight"], t[f"{p}.ff2.bias"] = rand(d, ff, scale=1 / math.sqrt(ff)), rand(d, scale=0.1)
    t["encoder.ln_final.weight"], t["encoder.ln_final.bias"] = 1 + rand(d, scale=0.1), rand(d, scale=0.1)
    t["world_transition.action_embed.weight"] = rand(1, a, scale=1.0)
    t["world_transition.fc1.weight"] = rand(hidden, d + a, scale=1 / math.sqrt(d + a))
    t["world_transition.fc1.bias"] = rand(hidden, scale=0.1)
    t["world_transition.fc2.weight"] = rand(d, hidden, scale=1 / math.sqrt(hidden))
    t["world_transition.fc2.bias"] = rand(d, scale=0.1)
    t["decoder_bridge.proj.weight"] = rand(b, d, scale=1 / math.sqrt(d))
    t["decoder_bridge.proj.bias"] = rand(b, scale=0.1)
    meta = {"dim": str(d), "max_seq": str(args.max_seq), "num_layers": str(args.layers),
            "num_heads": str(args.heads), "bridge_dim": str(b), "seed": str(args.seed)}
    write_safetensors(args.out, t, meta)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("parity")
    p.add_argument("model")
    p.add_argument("dumps", nargs="+")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    bn = sub.add_parser("bench")
    bn.add_argument("model")
    bn.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    bn.add_argument("--iters", type=int, default=200)
    r = sub.add_parser("random")
    r.add_argument("out")
    r.add_argument("--vocab-size", type=int, required=True)
    r.add_argument("--dim", type=int, default=368)
    r.add_argument("--layers", type=int, default=4)
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--bridge-dim", type=int, default=256)
    for q in (p, bn, r):
        q.add_argument("--heads", type=int, default=None if q is not r else 8)
        q.add_argument("--max-seq", type=int, default=None if q is not r else 128)
    args = ap.parse_args()
    {"parity": parity, "compare": compare, "bench": bench, "random": random_checkpoint}[args.cmd](args)


if __name__ == "__main__":
    main()
