"""The sections of the GPU check that prove training paths: each runs alone in its own process.

Why this module exists: the code paths that run only with CUDA (NCCL, SyncBatchNorm, bf16/fp16
with DeepSpeed, compile with checkpointing) are proven on a GPU machine we hold for minutes. Each
function here is one section; it returns {"passed", "figures", "detail"} and raises on a bug.
In `dry` mode the same code runs on CPU at tiny sizes (gloo; what needs CUDA is named and skipped),
so CI checks the script itself. The performance sections are in `gpu_perf.py`.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
Result = dict[str, Any]


@dataclass(frozen=True)
class Ctx:
    """Where a section runs: `gpu` (one CUDA device) or `dry` (CPU, tiny), its folder, shared data."""

    mode: str
    out: Path
    data: Path

    @property
    def gpu(self) -> bool:
        return self.mode == "gpu"

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0) if self.gpu else torch.device("cpu")


def train_overrides(ctx: Ctx, run_dir: Path, steps: int) -> list[str]:
    """A small real training run: width 16 / 128 px tiles on the GPU, width 4 / 32 px in dry mode."""
    size = ["model.base_width=16", "model.depth=4", "data.shard.tile=128", "data.synth.images=24",
            "data.synth.height=512", "data.synth.width=512", "data.batch_size=16", "data.workers=4",
            "train.precision=bf16", "train.channels_last=true", "train.activation_checkpointing=highres"]
    if not ctx.gpu:
        size = ["model.base_width=4", "model.depth=2", "data.shard.tile=32", "data.synth.images=6",
                "data.synth.height=96", "data.synth.width=96", "data.batch_size=4", "data.workers=0",
                "train.activation_checkpointing=highres"]
    return [f"run.dir={run_dir}", f"data.root={ctx.data / 'train'}", "data.generate=true", "data.shuffle_buffer=16",
            "data.shard.val_fraction=0.25", "train.warmup_steps=2", "train.lr=0.01", f"train.steps={steps}",
            "train.log_every=1", f"train.val_every={steps // 2}", f"train.ckpt_every={steps // 2}", *size]


def _torchrun(ctx: Ctx, overrides: list[str], proof: Path) -> list[str]:
    return [sys.executable, "-m", "unetdist.parallel.agent", "--standalone", "--nproc_per_node=1",
            "--max-restarts=0", "--signals-to-handle=SIGTERM,SIGINT,SIGUSR1", "--shutdown-timeout=60",
            "-m", "unetdist.bench.gpu_check", "worker-train", "--proof", str(proof),
            "--config", str(REPO / "configs/default.yaml"), *overrides]


def _losses(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def _scalars(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def _stopped_run(ctx: Ctx, overrides: list[str], proof: Path, stop_after: int) -> tuple[int, str]:
    """A run sent SIGUSR1 (at its agent, as `scancel -s USR1` does) once it logged step `stop_after`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_torchrun(ctx, overrides, proof), cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if f" step {stop_after} " in line or f"step {stop_after}/" in line:
            proc.send_signal(signal.SIGUSR1)
            break
    rest, _ = proc.communicate(timeout=300)
    return proc.returncode, "".join(lines) + rest


def section_train(ctx: Ctx) -> Result:
    """torchrun, 1 process, NCCL: the real loop with validation, checkpoints, a stop signal and resume."""
    steps = 30 if ctx.gpu else 8
    whole, broken = ctx.out / "unbroken", ctx.out / "stopped"
    proof = ctx.out / "group.json"
    run = subprocess.run(_torchrun(ctx, train_overrides(ctx, whole, steps), proof), cwd=REPO, text=True,
                         capture_output=True, timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"unbroken run exited {run.returncode}: {run.stderr[-1500:]}")
    group = json.loads(proof.read_text())
    code, output = _stopped_run(ctx, train_overrides(ctx, broken, steps), proof, steps // 3)
    if code != 75:
        raise RuntimeError(f"SIGUSR1 to the agent: exit {code}, expected 75 (resumable): {output[-1500:]}")
    stopped_at = sorted(int(p.name.split("_")[1].split(".")[0]) for p in (broken / "checkpoints").glob("step_*"))
    resumed = subprocess.run(_torchrun(ctx, train_overrides(ctx, broken, steps), proof), cwd=REPO, text=True,
                             capture_output=True, timeout=600)
    if resumed.returncode != 0:
        raise RuntimeError(f"resumed run exited {resumed.returncode}: {resumed.stderr[-1500:]}")
    a, b = _losses(whole), _losses(broken)
    tolerance = 2e-3 if ctx.gpu else 1e-5  # cuDNN's backward is not bit-reproducible
    worst = max(abs(a[s] - b[s]) / max(abs(a[s]), 1e-8) for s in a) if a.keys() == b.keys() else float("inf")
    metrics = json.loads((whole / "metrics.json").read_text())
    expected_backend = "nccl" if ctx.gpu else "gloo"
    figures = {"steps": steps, "backend": group["backend"], "stopped_after_step": stopped_at[:1],
               "resume_max_rel_loss_diff": worst, "final_loss": a.get(steps), "val_dice_fg": metrics["dice/foreground"],
               "mfu": (_scalars(whole, "train/mfu") or [None])[-1], "hfu": (_scalars(whole, "train/hfu") or [None])[-1],
               "images_per_s": (_scalars(whole, "train/images_per_s") or [None])[-1],
               "peak_memory_gb": (_scalars(whole, "train/peak_memory_gb") or [None])[-1]}
    passed = group["backend"] == expected_backend and group["initialized"] and worst <= tolerance
    return {"passed": passed, "figures": figures,
            "detail": f"backend {group['backend']} (expected {expected_backend}); resumed losses within "
                      f"{worst:.2e} of unbroken (tolerance {tolerance:g})"}


def _synthetic_batches(ctx: Ctx, steps: int, size: int, batch: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        image = torch.randn(batch, 1, size, size, generator=gen)
        blurred = torch.nn.functional.avg_pool2d(image, 5, 1, 2)
        out.append({"image": image, "label": (blurred[:, 0] > 0.1).long()})
    return out


def section_deepspeed(ctx: Ctx) -> Result:
    """DeepSpeed ZeRO-2 in bf16 and in fp16 (autocast + DeepSpeed's loss scaler), a group of one."""
    from unetdist.config import load_config
    from unetdist.parallel.env import destroy_distributed, init_distributed
    from unetdist.train.trainer import build_trainer

    env = init_distributed(group_for_one=True)
    size, batch, steps = (128, 16, 12) if ctx.gpu else (16, 2, 4)
    batches = _synthetic_batches(ctx, 2, size, batch) * (steps // 2)  # two batches in turn: the loss must fall
    figures: dict[str, Any] = {}
    passed = True
    try:
        for precision in ("bf16", "fp16"):
            cfg = load_config(None, [f"run.dir={ctx.out}", "parallel.backend=deepspeed", "parallel.deepspeed.zero_stage=2",
                                     f"train.precision={precision}", f"model.base_width={16 if ctx.gpu else 4}",
                                     f"model.depth={4 if ctx.gpu else 2}", f"data.batch_size={batch}", "train.lr=0.01",
                                     "train.warmup_steps=1", f"train.steps={steps}"])
            trainer = build_trainer(cfg, env)
            start = time.perf_counter()
            outs = [trainer.train_step(b) for b in batches]
            losses = [float(o["loss"]) for o in outs]
            seconds = (time.perf_counter() - start) / steps
            scale = float(outs[-1]["loss_scale"]) if "loss_scale" in outs[-1] else None
            amp = str(trainer.engine.amp_dtype).removeprefix("torch.")
            ok = all(map(_finite, losses)) and sum(losses[-2:]) < sum(losses[:2]) and amp == {"bf16": "bfloat16", "fp16": "float16"}[precision]
            if precision == "fp16":
                ok = ok and scale is not None and scale >= 1
            figures[precision] = {"first_loss": losses[0], "last_loss": losses[-1], "loss_scale": scale,
                                  "autocast": amp, "step_s": seconds, "passed": ok}
            passed = passed and ok
    finally:
        destroy_distributed()
    return {"passed": passed, "figures": figures, "detail": "ZeRO-2 bf16 and fp16: loss falls, fp16 loss scale read"}


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def _grads(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
           dtype: torch.dtype | None) -> tuple[float, dict[str, torch.Tensor]]:
    from unetdist.train.metrics import segmentation_loss

    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        logits = model(batch["image"].to(device))
    loss = segmentation_loss(logits.float(), batch["label"].to(device), 0.5, None)
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
    den = sum(float(b[k].pow(2).sum()) for k in b)
    return (num / max(den, 1e-30)) ** 0.5


def section_syncbn(ctx: Ctx) -> Result:
    """SyncBatchNorm conversion with activation checkpointing, one rank: same gradients as BatchNorm."""
    from unetdist.model import UNet
    from unetdist.parallel.checkpointing import apply_activation_checkpointing
    from unetdist.parallel.env import destroy_distributed, init_distributed

    env = init_distributed(group_for_one=True)
    try:
        torch.manual_seed(0)
        plain = UNet(in_channels=1, num_classes=2, base_width=8, depth=3)
        synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
        for model in (plain, synced):
            apply_activation_checkpointing(model, "all")
        converted = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
        if not ctx.gpu:
            return {"passed": converted > 0, "figures": {"sync_batchnorm_layers": converted},
                    "detail": "converted and checkpointed; forward skipped (SyncBatchNorm runs on CUDA only)"}
        batch = _synthetic_batches(ctx, 1, 64, 4)[0]
        loss_a, grads_a = _grads(plain.to(env.device), batch, env.device, None)
        loss_b, grads_b = _grads(synced.to(env.device), batch, env.device, None)
        rel = _rel(grads_b, grads_a)
        stats = max(float((a - b).abs().max()) for (_, a), (_, b) in
                    zip(plain.named_buffers(), synced.named_buffers()) if a.dtype.is_floating_point)
        passed = converted > 0 and abs(loss_a - loss_b) <= 1e-4 * abs(loss_a) and rel <= 1e-3 and stats <= 1e-4
        return {"passed": passed, "figures": {"sync_batchnorm_layers": converted, "grad_rel_l2": rel,
                                              "bn_stats_max_diff": stats, "loss": loss_b},
                "detail": "SyncBatchNorm + checkpointing on 1 rank vs BatchNorm: loss, gradients, statistics"}
    finally:
        destroy_distributed()


def section_compile(ctx: Ctx) -> Result:
    """torch.compile of a checkpointed model trains like eager: loss, gradients, BatchNorm statistics."""
    from unetdist.model import UNet
    from unetdist.parallel.checkpointing import apply_activation_checkpointing

    device = ctx.device
    torch.backends.cuda.matmul.allow_tf32 = False  # compare arithmetic, not TF32 rounding
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    eager = UNet(in_channels=1, num_classes=2, base_width=16 if ctx.gpu else 4, depth=4 if ctx.gpu else 2)
    apply_activation_checkpointing(eager, "all")
    compiled = copy.deepcopy(eager).to(device)
    eager.to(device)
    backend = "inductor" if ctx.gpu else "aot_eager"  # aot_eager: the same AOTAutograd graphs, no code generation
    start = time.perf_counter()
    compiled.compile(backend=backend)
    batches = _synthetic_batches(ctx, 3, 128 if ctx.gpu else 32, 8 if ctx.gpu else 2)
    worst_loss, worst_grad = 0.0, 0.0
    for batch in batches:
        loss_a, grads_a = _grads(eager, batch, device, None)
        loss_b, grads_b = _grads(compiled, batch, device, None)
        worst_loss = max(worst_loss, abs(loss_a - loss_b) / max(abs(loss_a), 1e-8))
        worst_grad = max(worst_grad, _rel(grads_b, grads_a))
        with torch.no_grad():
            for p in list(eager.parameters()) + list(compiled.parameters()):
                p -= 0.01 * p.grad
    seconds = time.perf_counter() - start
    stats = max(float((a.double() - b.double()).abs().max()) for a, b in zip(eager.buffers(), compiled.buffers()))
    tolerance = 1e-3 if ctx.gpu else 1e-6
    return {"passed": worst_loss <= tolerance and worst_grad <= tolerance and stats <= 1e-3,
            "figures": {"backend": backend, "loss_rel_diff": worst_loss, "grad_rel_l2": worst_grad,
                        "bn_buffers_max_diff": stats, "compile_and_steps_s": seconds},
            "detail": f"compiled ({backend}) + checkpointing=all vs eager, 3 steps (tolerance {tolerance:g})"}
