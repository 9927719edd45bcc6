"""``longtrain plan``: will every stage fit, and how long will a step take, before anything is launched."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

from longtrain.config import load_config
from longtrain.errors import run_command

EPILOG = """examples:
  longtrain plan --config configs/qwen2_7b_4k_to_32k.yaml --set model.name_or_path=configs/models/qwen2-7b \\
      --world-size 16 --nodes 2 --device cuda --device-memory 80GB
  longtrain plan --config configs/tiny_cpu.yaml --world-size 2 --device cpu --json
Needs only the model's config.json (the model is built on the meta device: no weights, no GPU).
Reference: docs/plan.md (every term, its formula and its source; measured accuracy).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longtrain plan", description="Peak memory per rank and step time of every stage of a run, "
        "before launching it.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run recipe (YAML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, as for `longtrain train` (repeatable)")
    parser.add_argument("--world-size", type=int, required=True, help="number of ranks (GPUs or CPU processes)")
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes the ranks are spread over (default 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="what the ranks train on (default: cuda when this machine has a GPU, else cpu)")
    parser.add_argument("--device-memory", default=None, metavar="SIZE",
                        help="memory per GPU, e.g. 80GB (default: this machine's GPU, else 80GB); on cpu an "
                             "optional per-rank limit")
    parser.add_argument("--host-memory", default=None, metavar="SIZE",
                        help="host memory per node, e.g. 1TB (default: this machine's MemTotal on cpu; "
                             "not checked on cuda unless given)")
    parser.add_argument("--gpu", default=None, metavar="NAME",
                        help="GPU model for the dense bf16 peak (longtrain.metrics.GPU_PEAK_FLOPS), default: "
                             "this machine's GPU, else H100")
    parser.add_argument("--peak-tflops", type=float, default=None, help="per-device peak (overrides --gpu / "
                        "train.peak_tflops; default on cpu: the matmul peak measured now)")
    parser.add_argument("--efficiency", type=float, default=None,
                        help="fraction of the peak a step's FLOPs reach (default 0.5 on cuda, 0.7 on cpu)")
    parser.add_argument("--bandwidth", type=float, default=25.0, metavar="GB/s",
                        help="per-rank bandwidth between nodes, GB/s (default 25: 200 Gb/s InfiniBand)")
    parser.add_argument("--intra-node-bandwidth", type=float, default=150.0, metavar="GB/s",
                        help="per-rank bandwidth inside a node, GB/s (default 150)")
    parser.add_argument("--json", action="store_true", help="write the plan as JSON to stdout")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return run_command("longtrain plan", lambda: _plan(args))


def _plan(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    # With --json, stdout is the JSON alone: what the libraries print while loading (DeepSpeed's logger
    # writes "Setting accelerator to CPU" to the stdout it finds at import) goes to stderr.
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        # Imported after the config is read: torch and transformers take seconds (DESIGN.md: a config
        # error should not wait for them).
        from longtrain.plan import build_target, plan_run
        from longtrain.plan.report import format_plan, plan_json

        target = build_target(cfg, world_size=args.world_size, nodes=args.nodes, device=args.device,
                              device_memory=args.device_memory, host_memory=args.host_memory, gpu=args.gpu,
                              peak_tflops=args.peak_tflops, efficiency=args.efficiency,
                              bandwidth_gbs=args.bandwidth, intra_node_bandwidth_gbs=args.intra_node_bandwidth)
        run = plan_run(cfg, target)
    if args.json:
        print(json.dumps(plan_json(run), indent=1))
    else:
        print(format_plan(run))
    return 0
