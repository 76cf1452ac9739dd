"""A model of data-parallel efficiency: how much of DDP's gradient all-reduce backward hides.

Why this module exists: we can measure 1 vs 2 processes here, not 512 GPUs. The model takes
what we know exactly (the UNet's FLOPs and parameter bytes per stage, from
``unetdist.model.flops`` and the module itself), what the configs set (DDP bucket size, gradient
dtype) and published interconnect bandwidths, and replays one backward pass:

* backward visits the stages from ``outc`` back to ``inc``; each stage takes its share of the
  backward time in proportion to its FLOPs, and its gradients are ready when it finishes;
* DDP fills buckets (the first one 1 MB, then ``bucket_mb``) in reverse parameter order, which
  for this UNet is backward order, and all-reduces each bucket as soon as all its gradients are
  ready, one at a time;
* one all-reduce of ``b`` bytes over ``g`` GPUs per node and ``n`` nodes takes
  ``latency + 2 log2(n) hop + 2 (g-1)/g b / intra + 2 (n-1)/n b / node`` (reduce-scatter and all-gather inside
  the node, then across nodes on the node's total injection bandwidth; NCCL overlaps these
  phases, so this errs on the slow side);
* what remains after backward ends is exposed; efficiency = step / (step + exposed).

``python -m unetdist.bench.scaling`` prints the tables of ``docs/scaling.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from unetdist.model import UNet
from unetdist.model.flops import forward_flops_by_stage, train_step_flops

FIRST_BUCKET_BYTES = 1 * 2**20  # torch.distributed's default first-bucket cap


@dataclass(frozen=True)
class Interconnect:
    """Effective all-reduce bandwidths in bytes/s (about 80% of the links' nominal rates)."""

    name: str
    intra: float  # within a node (bus bandwidth over NVLink/NVSwitch)
    node: float  # one node's total injection bandwidth to the others
    latency: float = 30e-6  # seconds per all-reduce call inside a node
    hop: float = 5e-6  # seconds per inter-node tree level and direction


GB = 1e9
# Nominal rates: NVLink 4 + NVSwitch 450 GB/s per GPU per direction; InfiniBand NDR 400 Gb/s and
# HDR 200 Gb/s per port; 100 GbE one port per node.
INTERCONNECTS: tuple[Interconnect, ...] = (
    Interconnect("NVLink + 8x IB NDR", intra=360 * GB, node=8 * 40 * GB),
    Interconnect("NVLink + 8x IB HDR", intra=360 * GB, node=8 * 20 * GB),
    Interconnect("NVLink + 1x IB HDR", intra=360 * GB, node=20 * GB),
    Interconnect("NVLink + 1x 100 GbE", intra=360 * GB, node=10 * GB, hop=20e-6),
)


def stage_param_bytes(base_width: int = 64, bytes_per_value: int = 4) -> dict[str, int]:
    """Gradient bytes per stage (``inc``, ``downs.i``, ``ups.j``, ``outc``), in parameter order."""
    with torch.device("meta"):
        model = UNet(base_width=base_width)
    out: dict[str, int] = {}
    for name, param in model.named_parameters():
        stage = name.split(".")[0] if name.startswith(("inc", "outc")) else ".".join(name.split(".")[:2])
        out[stage] = out.get(stage, 0) + param.numel() * bytes_per_value
    return out


def buckets(stage_bytes: dict[str, int], bucket_bytes: int) -> list[tuple[int, str]]:
    """(bytes, stage whose gradients complete the bucket), in DDP's order (reverse parameter order)."""
    out: list[tuple[int, str]] = []
    cap, filled = FIRST_BUCKET_BYTES, 0
    for stage, size in reversed(list(stage_bytes.items())):
        while size > 0:
            take = min(size, cap - filled)
            filled += take
            size -= take
            if filled >= cap:
                out.append((filled, stage))
                cap, filled = bucket_bytes, 0
        if filled and stage == next(iter(stage_bytes)):
            out.append((filled, stage))
    return out


def allreduce_seconds(size: float, gpus_per_node: int, nodes: int, link: Interconnect) -> float:
    """One all-reduce: latency (growing as a tree across nodes) + intra-node + inter-node transfer."""
    g, n = gpus_per_node, nodes
    latency = link.latency + 2 * math.log2(n) * link.hop
    return latency + 2 * (g - 1) / g * size / link.intra + 2 * (n - 1) / n * size / link.node


def exposed_seconds(step_s: float, stage_flops: dict[str, int], stage_bytes: dict[str, int], bucket_bytes: int,
                    comm: Callable[[float], float], backward_fraction: float = 2 / 3) -> float:
    """Seconds of all-reduce left after backward ends, replaying one backward pass (module docstring)."""
    total = sum(stage_flops.values())
    backward = step_s * backward_fraction
    ready, elapsed = {}, 0.0
    for stage in reversed(list(stage_flops)):  # backward order
        elapsed += backward * stage_flops[stage] / total
        ready[stage] = elapsed
    busy_until = 0.0
    for size, stage in buckets(stage_bytes, bucket_bytes):
        busy_until = max(busy_until, ready[stage]) + comm(size)
    return max(0.0, busy_until - backward)


def efficiency(gpus: int, link: Interconnect, *, step_s: float, tile: int = 512, batch: int = 16,
               base_width: int = 64, bucket_mb: float = 25, grad_bytes: int = 4, gpus_per_node: int = 8,
               sync_bn: bool = True) -> float:
    """Modelled DDP efficiency (step / (step + exposed communication)) for ``gpus`` GPUs.

    ``sync_bn``: SyncBatchNorm adds two small collectives per BatchNorm layer (statistics in
    forward, gradient sums in backward) on the critical path: latency, never hidden.
    """
    if gpus <= 1:
        return 1.0
    g = min(gpus, gpus_per_node)
    nodes = math.ceil(gpus / g)
    flops = forward_flops_by_stage(tile, tile, batch, base_width=base_width)
    sizes = stage_param_bytes(base_width, grad_bytes)
    exposed = exposed_seconds(step_s, flops, sizes, int(bucket_mb * 2**20 * grad_bytes / 4),
                              lambda size: allreduce_seconds(size, g, nodes, link))
    if sync_bn:
        bn_layers = 2 * len(flops) - 2  # two per stage; the head has none
        exposed += 2 * bn_layers * allreduce_seconds(16 * base_width * 16, g, nodes, link)
    return step_s / (step_s + exposed)


def measured_efficiency_model(step_s: float, allreduce_s: float, gradient_bytes: int, *, tile: int, batch: int,
                              base_width: int, bucket_mb: float = 25) -> float:
    """The model fed with what a 2-process run measured: one process's step and its gradient's all-reduce
    time (bytes charged pro rata, no latency term). Compared with the measured efficiency in the bench."""
    flops = forward_flops_by_stage(tile, tile, batch, base_width=base_width)
    sizes = stage_param_bytes(base_width, 4)
    exposed = exposed_seconds(step_s, flops, sizes, int(bucket_mb * 2**20),
                              lambda size: allreduce_s * size / gradient_bytes)
    return step_s / (step_s + exposed)


def bucket_table(gpus: int = 64, mfu: float = 0.45) -> str:
    """Efficiency against DDP bucket size at ``gpus`` GPUs, fp32 gradients, as a Markdown table."""
    step = h100_step_s(mfu)
    sizes = (5, 25, 50, 100)
    lines = ["| interconnect | " + " | ".join(f"{mb} MB" for mb in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for link in INTERCONNECTS:
        cells = [f"{efficiency(gpus, link, step_s=step, bucket_mb=mb):.3f}" for mb in sizes]
        lines.append(f"| {link.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def h100_step_s(mfu: float, tile: int = 512, batch: int = 16, policy: str = "highres") -> float:
    """Step time of the default model on an H100 SXM (bf16 dense peak 989.4 TFLOP/s) at ``mfu``."""
    return train_step_flops(tile, tile, batch, policy=policy) / (mfu * 989.4e12)


def markdown_table(grad_bytes: int, mfu: float = 0.45, bucket_mb: float = 25, sync_bn: bool = True) -> str:
    """Efficiency for 8..512 GPUs per interconnect, as a Markdown table."""
    step = h100_step_s(mfu)
    lines = ["| GPUs | " + " | ".join(link.name for link in INTERCONNECTS) + " |",
             "|---:|" + "---:|" * len(INTERCONNECTS)]
    for gpus in (8, 16, 32, 64, 128, 256, 512):
        values = (efficiency(gpus, link, step_s=step, bucket_mb=bucket_mb, grad_bytes=grad_bytes, sync_bn=sync_bn)
                  for link in INTERCONNECTS)
        cells = [f"{value:.3f}" for value in values]
        lines.append(f"| {gpus} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    step_ms = h100_step_s(0.45) * 1e3
    for label, size, sync_bn in (("fp32 gradients (124 MB), SyncBatchNorm", 4, True),
                                 ("bf16-compressed gradients (62 MB), SyncBatchNorm", 2, True),
                                 ("bf16-compressed gradients, plain BatchNorm", 2, False)):
        print(f"### {label}; H100 step {step_ms:.1f} ms (45% MFU, batch 16, ckpt=highres)\n")
        print(markdown_table(size, sync_bn=sync_bn), "\n")
    print("### bucket size, 64 GPUs, fp32 gradients, SyncBatchNorm\n")
    print(bucket_table())
