#!/usr/bin/env python3
"""Writes tests/fixtures/seed-tiny: a small world-model checkpoint in the seed's
format (the seed's tensor names, F32, no __metadata__, as the seed's trainer
wrote them), its vocab_world.txt, and expected.json with conditioning vectors
computed by an independent NumPy float64 forward pass of
../shared/specs/world-checkpoint.md.

The Rust tests load these files unchanged and must match expected.json: this
is the "checkpoint written by another Tofy implementation" check.

Needs: pip install numpy safetensors. Deterministic (fixed seed).
"""

import json
import math
import os
import sys

import numpy as np
from safetensors.numpy import save_file

DIM, LAYERS, HEADS, MAX_SEQ, BRIDGE = 48, 2, 4, 16, 24
OUT = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/seed-tiny"

WORDS = """write a short gpu recommendation for training small models hi , it's 5pm !
the what is best card memory speed ? . i you we they and or not cheap fast
café é ü hello world 42 don't can't""".split()
# Seed-style vocab file: reserved tokens first, CRLF endings, a duplicate and
# an empty line that loaders must skip.
VOCAB_LINES = ["<pad>", "<unk>", "<mask>"] + WORDS[:10] + ["", "gpu"] + WORDS[10:]

PROMPTS = [
    "write a short gpu recommendation",
    "Hi, it's 5pm!",
    "what is the best card for training small models? i want fast memory and cheap speed",
    "café über straße",
    "\tnew\nlines\r\nand\ttabs  ",
]


def vocab_ids(lines):
    ids = {}
    for tok in ["<pad>", "<unk>", "<mask>"] + lines:
        if tok and tok not in ids:
            ids[tok] = len(ids)
    return ids


def tokenize(text):
    toks, word = [], ""
    for c in text:
        if c.isascii() and (c.isalnum() or c == "'"):
            word += c
            continue
        if word:
            toks.append(word)
            word = ""
        if not c.isspace():
            toks.append(c)
    if word:
        toks.append(word)
    return toks


def init(rng, vocab_size):
    a, h, f = max(DIM // 4, 32), max(3 * DIM // 2, 128), 4 * DIM
    t = {}

    def lin(name, out, inp):
        t[f"{name}.weight"] = rng.normal(0, 1 / math.sqrt(inp), (out, inp))
        t[f"{name}.bias"] = rng.normal(0, 0.1, (out,))

    def ln(name):
        t[f"{name}.weight"] = 1 + rng.normal(0, 0.1, (DIM,))
        t[f"{name}.bias"] = rng.normal(0, 0.1, (DIM,))

    t["encoder.embed.weight"] = rng.normal(0, 1, (vocab_size, DIM))
    for i in range(LAYERS):
        b = f"encoder.block_{i}"
        for p in ["q_proj", "k_proj", "v_proj", "out_proj"]:
            lin(f"{b}.attn.{p}", DIM, DIM)
        ln(f"{b}.ln1")
        ln(f"{b}.ln2")
        lin(f"{b}.ff1", f, DIM)
        lin(f"{b}.ff2", DIM, f)
    ln("encoder.ln_final")
    t["world_transition.action_embed.weight"] = rng.normal(0, 1, (1, a))
    lin("world_transition.fc1", h, DIM + a)
    lin("world_transition.fc2", DIM, h)
    lin("decoder_bridge.proj", BRIDGE, DIM)
    # Round to f32 first: the file stores f32, the reference reads those values.
    return {k: v.astype(np.float32) for k, v in t.items()}


def forward(t, ids):
    w = {k: v.astype(np.float64) for k, v in t.items()}
    length = min(len(ids), MAX_SEQ)
    ids = (ids[:MAX_SEQ] + [0] * MAX_SEQ)[:MAX_SEQ]
    pos = np.arange(MAX_SEQ)[:, None]
    j = np.arange(DIM)[None, :]
    angle = pos / np.power(10000.0, (j - j % 2) / DIM)
    pe = np.where(j % 2 == 0, np.sin(angle), np.cos(angle)).astype(np.float32).astype(np.float64)
    x = w["encoder.embed.weight"][ids] + pe

    def lin(name, v):
        return v @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    def ln(name, v):
        mu = v.mean(-1, keepdims=True)
        var = ((v - mu) ** 2).mean(-1, keepdims=True)
        return (v - mu) / np.sqrt(var + 1e-5) * w[f"{name}.weight"] + w[f"{name}.bias"]

    hd = DIM // HEADS
    for i in range(LAYERS):
        b = f"encoder.block_{i}"
        h = ln(f"{b}.ln1", x)
        q, k, v = (lin(f"{b}.attn.{p}", h) for p in ["q_proj", "k_proj", "v_proj"])
        ctx = np.zeros_like(x)
        for hh in range(HEADS):
            c = slice(hh * hd, (hh + 1) * hd)
            s = q[:, c] @ k[:, c].T / math.sqrt(hd)
            s = np.exp(s - s.max(-1, keepdims=True))
            ctx[:, c] = (s / s.sum(-1, keepdims=True)) @ v[:, c]
        x = x + lin(f"{b}.attn.out_proj", ctx)
        g = lin(f"{b}.ff1", ln(f"{b}.ln2", x))
        g = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
        x = x + lin(f"{b}.ff2", g)
    x = ln("encoder.ln_final", x)
    latent = x[:length].mean(0)
    z = np.concatenate([latent, w["world_transition.action_embed.weight"][0]])
    nxt = lin("world_transition.fc2", np.maximum(lin("world_transition.fc1", z), 0))
    return length, lin("decoder_bridge.proj", nxt)


def main():
    os.makedirs(OUT, exist_ok=True)
    ids = vocab_ids(VOCAB_LINES)
    rng = np.random.default_rng(20261126)
    tensors = init(rng, len(ids))
    save_file(tensors, os.path.join(OUT, "model_world_tiny.safetensors"))
    with open(os.path.join(OUT, "vocab_world.txt"), "wb") as f:
        f.write("".join(line + "\r\n" for line in VOCAB_LINES).encode())
    cases = []
    for p in PROMPTS:
        toks = tokenize(p)
        length, cond = forward(tensors, [ids.get(t, 1) for t in toks])
        cases.append({"prompt": p, "tokens": length, "conditioning": [float(c) for c in cond]})
    expected = {
        "generator": "scripts/make_seed_fixture.py (NumPy float64 reference)",
        "config": {"dim": DIM, "num_layers": LAYERS, "num_heads": HEADS, "max_seq": MAX_SEQ,
                   "vocab_size": len(ids), "bridge_dim": BRIDGE},
        "cases": cases,
    }
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT}: vocab {len(ids)}, {len(cases)} cases")


if __name__ == "__main__":
    main()
