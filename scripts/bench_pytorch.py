#!/usr/bin/env python3
"""Plain-PyTorch CPU step time for one BlockTrain block, for side-by-side comparison.

Mirrors crates/model/src/transformer/ (the Denoiser: pre-norm byte transformer,
rotary GPT-NeoX half-split, F.rms_norm, SDPA, tanh-GELU MLP) and the interval
loss of crates/model/src/diffusion.rs, with AdamW + global-norm clipping as in the
Rust trainer. Shapes, ops and inits match; random bytes stand in for data (timing only).

Optional: needs the full PyTorch module (`scripts/setup --with-pytorch`), then
    .venv/bin/python scripts/bench_pytorch.py [--fused] [--bf16] [--threads N] ...
Prints exactly one JSON line to stdout; everything else goes to stderr.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_VOCAB, OUTPUT_VOCAB, MASK_ID = 257, 256, 256
INIT_STD, NORM_EPS, ROPE_BASE = 0.02, 1e-6, 10_000.0


def linear(inp, out, std):
    lin = nn.Linear(inp, out, bias=False)
    nn.init.normal_(lin.weight, 0.0, std)
    return lin


class RmsNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.d, self.weight = d, nn.Parameter(torch.ones(d))

    def forward(self, x):
        return F.rms_norm(x, (self.d,), self.weight, eps=NORM_EPS)


def rope_tables(t, hd):
    inv_freq = torch.exp(torch.arange(hd // 2, dtype=torch.float32) * (-2.0 * math.log(ROPE_BASE) / hd))
    angles = torch.arange(t, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (T, hd/2)
    return angles.cos(), angles.sin()


def rope(x, cos, sin):  # x (N, H, T, hd)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class Layer(nn.Module):
    def __init__(self, d, heads, n_layers):
        super().__init__()
        proj_std = INIT_STD / math.sqrt(2 * n_layers)
        self.heads = heads
        self.norm1, self.norm2 = RmsNorm(d), RmsNorm(d)
        self.qkv, self.attn_proj = linear(d, 3 * d, INIT_STD), linear(d, d, proj_std)
        self.fc, self.mlp_proj = linear(d, 4 * d, INIT_STD), linear(4 * d, d, proj_std)

    def attn(self, x, cos, sin):
        n, t, d = x.shape
        qkv = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = rope(qkv[0], cos, sin), rope(qkv[1], cos, sin), qkv[2]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=False)  # (N, H, T, hd)
        return self.attn_proj(y.transpose(1, 2).contiguous().view(n, t, d))

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp_proj(F.gelu(self.fc(self.norm2(x)), approximate="tanh"))


class Denoiser(nn.Module):
    def __init__(self, d, n_layers, heads, window):
        super().__init__()
        self.tok_emb = nn.Embedding(INPUT_VOCAB, d)
        nn.init.normal_(self.tok_emb.weight, 0.0, INIT_STD)
        self.layers = nn.ModuleList(Layer(d, heads, n_layers) for _ in range(n_layers))
        self.norm_f, self.head = RmsNorm(d), linear(d, OUTPUT_VOCAB, INIT_STD)
        cos, sin = rope_tables(window, d // heads)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, tokens):
        t = tokens.shape[1]
        cos, sin = self.cos[:t], self.sin[:t]
        x = self.tok_emb(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.head(self.norm_f(x))


def interval_loss(model, x, lo, hi):
    n, t = x.shape
    u = torch.rand(1)
    levels = lo + (hi - lo) * ((torch.arange(n, dtype=torch.float32) + u) / n)  # stratified t per sequence
    mask = torch.rand(n, t) < levels[:, None]
    mask.scatter_(1, torch.randint(t, (n,))[:, None], True)  # at least one masked position
    logits = model(x.masked_fill(mask, MASK_ID))
    nll = -F.log_softmax(logits, -1).gather(-1, x[..., None]).squeeze(-1)
    maskf = mask.float()
    return ((nll * maskf).sum(1) / maskf.sum(1) * (hi - lo)).mean()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, kind, default in [("--d-model", int, 128), ("--layers", int, 2), ("--heads", int, 4),
                                ("--window", int, 128), ("--batch", int, 32), ("--lo", float, 0.3333),
                                ("--hi", float, 0.6667), ("--steps", int, 30), ("--warmup", int, 5),
                                ("--threads", int, os.cpu_count()), ("--seed", int, 0)]:
        p.add_argument(flag, type=kind, default=default)
    p.add_argument("--fused", action="store_true", help="AdamW(fused=True) instead of the default (foreach)")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast for forward + loss (backward and AdamW on fp32 master weights)")
    a = p.parse_args()
    if a.steps < 1 or a.d_model % a.heads or (a.d_model // a.heads) % 2:
        p.error("need steps >= 1 and d_model split into heads of even width")

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model = Denoiser(a.d_model, a.layers, a.heads, a.window)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.0, fused=a.fused or None)  # None: PyTorch's default (foreach)
    params = sum(q.numel() for q in model.parameters())
    print(f"bench_pytorch: torch {torch.__version__}, {a.threads} threads, {params} params, "
          f"{'fused' if a.fused else 'default (foreach)'} AdamW, {'bf16 autocast' if a.bf16 else 'fp32'}",
          file=sys.stderr)

    def step(x):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):  # forward + loss only
            loss = interval_loss(model, x, a.lo, a.hi)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    for _ in range(a.warmup):
        step(torch.randint(0, 256, (a.batch, a.window)))
    times = []
    for _ in range(a.steps):
        x = torch.randint(0, 256, (a.batch, a.window))  # random bytes (timing only), drawn untimed
        t0 = time.perf_counter()
        loss = step(x)
        times.append(time.perf_counter() - t0)
    mean = statistics.fmean(times)
    print(json.dumps({
        "impl": "pytorch", "torch_version": torch.__version__, "threads": a.threads, "bf16": a.bf16,
        "step_ms_mean": mean * 1e3, "step_ms_median": statistics.median(times) * 1e3,
        "step_ms_min": min(times) * 1e3, "tokens_per_s": a.batch * a.window / mean,
        "params": params, "final_loss": loss,
    }))


if __name__ == "__main__":
    main()
