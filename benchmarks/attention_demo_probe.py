"""One step's loss and gradients of the `megaquant demo` model through the fused and the unfused attention
core, from the same weights, at a trained state (CPU; docs/benchmarks.md §8).

`PYTHONPATH=TREE:. python benchmarks/attention_demo_probe.py --seed 1 --steps 80 --train-core auto`
with TREE a megatron-core tree whose sites hold the mode's values (`benchmarks/attention_demo_seeds.py`
leaves one per mode under DIR/trees/). Trains the demo's model (`megaquant.demo.demo_config`, the demo's
data order) for --steps AdamW steps at a constant lr 3e-3 on --train-core (auto = fused, or unfused),
then on the next batch prints: the loss difference fused - unfused, the largest relative gradient
difference (per-parameter norm), and, as a yardstick, the same two numbers for the unfused core against
itself with every weight multiplied by (1 + 2^-24 N(0, 1)) — half an fp32 ulp.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--train-core", choices=["auto", "unfused"], default="unfused")
    parser.add_argument("--demo", type=Path, default=Path.home() / ".cache/megaquant/demo")
    args = parser.parse_args()

    from megatron.core import parallel_state

    from megaquant import ops
    from megaquant.demo import demo_config
    from megaquant.launch import minitrain

    data = args.demo / "data" / "stdlib_docstrings_bytes"
    cfg = dataclasses.replace(demo_config(Path("unused"), data, 150), seed=args.seed)
    ops.configure(**{**ops.environment_defaults(), "recipe": cfg.recipe})
    ops.reset_state(seed=cfg.seed)
    torch.set_flush_denormal(True)
    np.random.seed(cfg.seed)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    minitrain._cpu_adjustments()
    tokens = minitrain._load_tokens(cfg)
    window = cfg.seq_len + 1
    starts = np.arange(0, len(tokens) - window, cfg.seq_len)
    order = np.random.RandomState(cfg.seed).permutation(len(starts))
    torch.manual_seed(cfg.seed)
    model = minitrain._build_model(cfg, 256, False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    mask = torch.triu(torch.ones(cfg.seq_len, cfg.seq_len, dtype=torch.bool), 1)[None, None]
    pos = torch.arange(cfg.seq_len)[None].expand(cfg.micro_batch, -1)

    def batch(step: int) -> torch.Tensor:
        picks = [order[((step - 1) * cfg.micro_batch + i) % len(order)] for i in range(cfg.micro_batch)]
        return torch.from_numpy(np.stack([tokens[starts[j] : starts[j] + window] for j in picks]))

    def loss_grads(b: torch.Tensor, core: str) -> tuple[float, dict[str, torch.Tensor]]:
        os.environ["MEGAQUANT_ATTENTION"] = core
        model.zero_grad(set_to_none=True)
        loss = model(b[:, :-1], pos, mask, labels=b[:, 1:]).float().mean()
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        return max(((a[n] - b[n]).norm() / b[n].norm()).item() for n in b)

    for step in range(1, args.steps + 1):
        ops.next_step()
        loss_grads(batch(step), args.train_core)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
    b = batch(args.steps + 1)
    loss_u, grads_u = loss_grads(b, "unfused")
    loss_f, grads_f = loss_grads(b, "auto")
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        saved = [p.clone() for p in model.parameters()]
        for p in model.parameters():
            p.mul_(1 + 2.0**-24 * torch.randn(p.shape, generator=gen))
    loss_p, grads_p = loss_grads(b, "unfused")
    with torch.no_grad():
        for p, keep in zip(model.parameters(), saved, strict=True):
            p.copy_(keep)
    print(json.dumps(dict(
        seed=args.seed, steps=args.steps, train_core=args.train_core,
        fused_minus_unfused=dict(loss=loss_f - loss_u, worst_rel_grad=worst(grads_f, grads_u)),
        unfused_half_ulp_weights=dict(loss=loss_p - loss_u, worst_rel_grad=worst(grads_p, grads_u)),
    )))  # fmt: skip


if __name__ == "__main__":
    main()
