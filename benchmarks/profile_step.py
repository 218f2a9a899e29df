"""Profile the optimizer step of each geolora optimizer on MiniLM-shaped LoRA pairs.

For every optimizer: the median step time (interleaved with ``torch.optim.AdamW`` foreach on the
same shapes, same process, several rounds, so the shared-machine noise hits both alike) and the
top operators of ``torch.profiler`` (self CPU time per step). Used to write
``docs/benchmarks/perf_notes.md``.

Usage::

    python benchmarks/profile_step.py [--rank 8] [--threads 2] [--top 8] [--rounds 5]
        [--optimizers adams_lm lracs ...] [--json out.json] [--no-profile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from geolora.bench.perf import MINILM_SHAPES, adamw_factory, make_pairs, optimizer_factories
from geolora.bench.runner import optimizer_state_bytes

DEFAULT = (
    "lora_rite",
    "lracs",
    "adams_lm",
    "adams",
    "lifted_adam",
    "scaledgd",
    "loram_fr",
    "loram_br",
)


def _time(opt: torch.optim.Optimizer, steps: int, clock=time.perf_counter) -> list[float]:
    out = []
    for _ in range(steps):
        t0 = clock()
        opt.step()
        out.append(1e3 * (clock() - t0))
    return out


def profile_top(opt: torch.optim.Optimizer, steps: int, top: int) -> list[tuple[str, float, int]]:
    """``(op, self CPU ms per step, calls per step)`` of the ``top`` most expensive operators."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            opt.step()
    rows = []
    for ev in prof.key_averages():
        rows.append((ev.key, ev.self_cpu_time_total / 1e3 / steps, ev.count // steps))
    rows.sort(key=lambda t: -t[1])
    return rows[:top]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--steps", type=int, default=10, help="steps per round")
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--optimizers", nargs="*", default=list(DEFAULT))
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or process CPU time (steadier on a shared machine; use --threads 1)",
    )
    p.add_argument("--json", default=None)
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    factories = optimizer_factories(args.optimizers)
    base_factory: Callable[..., Any] = adamw_factory(torch.device("cpu"))
    report: dict[str, Any] = {
        "rank": args.rank,
        "threads": args.threads,
        "clock": args.clock,
        "optimizers": {},
    }
    for name, build in factories.items():
        opt = build(make_pairs(MINILM_SHAPES, args.rank), 1e-4)
        base = base_factory(make_pairs(MINILM_SHAPES, args.rank), 1e-4)
        for o in (opt, base):
            for _ in range(3):
                o.step()
        t_opt, t_base = [], []
        for _ in range(args.rounds):
            t_base += _time(base, args.steps, clock)
            t_opt += _time(opt, args.steps, clock)
        ms, base_ms = statistics.median(t_opt), statistics.median(t_base)
        entry: dict[str, Any] = {
            "step_ms": ms,
            "adamw_ms": base_ms,
            "ratio": ms / base_ms,
            "state_mib": optimizer_state_bytes(opt) / 2**20,
            "adamw_state_mib": optimizer_state_bytes(base) / 2**20,
        }
        print(
            f"{name:14s} r={args.rank}: {ms:8.2f} ms  AdamW {base_ms:6.2f} ms  "
            f"ratio {ms / base_ms:6.2f}  state {entry['state_mib']:.2f} MiB "
            f"(AdamW {entry['adamw_state_mib']:.2f})",
            flush=True,
        )
        if not args.no_profile:
            entry["top"] = profile_top(opt, 5, args.top)
            for op, t, calls in entry["top"]:
                print(f"    {op:40s} {t:8.3f} ms/step  {calls:5d} calls/step")
        report["optimizers"][name] = entry
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
