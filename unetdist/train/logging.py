"""What a person watching the run sees: TensorBoard on rank 0, throughput, progress, pictures.

Only rank 0 writes; other ranks get a writer that does nothing, so callers never branch on rank.
"""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetdist.data.progress import Progress
from unetdist.model.flops import train_step_flops_for
from unetdist.parallel.collectives import all_reduce_max, all_reduce_mean
from unetdist.parallel.env import DistEnv

log = logging.getLogger(__name__)


class RunLogger:
    """TensorBoard scalars/images plus progress: a bar in a terminal, `step N/total ... ETA` log lines otherwise."""

    def __init__(self, tb_dir: Path | None, total_steps: int, start_step: int) -> None:
        self.writer = None
        # Updated once per log interval, so every update is a line (interval 0).
        self.bar = Progress(total_steps, "train", "step", initial=start_step, enabled=tb_dir is not None, interval_s=0)
        if tb_dir is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a crashed run logged after its last checkpoint, so resumed curves have no repeats.
        self.writer = SummaryWriter(log_dir=str(tb_dir), purge_step=start_step + 1 if start_step > 0 else None)

    @property
    def active(self) -> bool:
        return self.writer is not None

    def scalars(self, step: int, values: dict[str, float], prefix: str) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def progress(self, step: int, values: dict[str, float]) -> None:
        """`train: step 120/1000 (12%) loss=... lr=..., 2.1 step/s, elapsed 57s, ETA 7:00` (rank 0 only)."""
        self.bar.set(step, " ".join(f"{k}={v:.4g}" for k, v in values.items()))

    def message(self, text: str) -> None:
        self.bar.write(text)

    def image_grid(self, step: int, grid: np.ndarray) -> None:
        if self.writer is not None:
            self.writer.add_image("val/input_target_prediction", grid, step, dataformats="HWC")

    def config(self, text: str, hparams: dict[str, float | int | str | bool]) -> None:
        """The resolved config as text, and the key settings in TensorBoard's HPARAMS tab (same run folder)."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        self.writer.add_text("config", f"```\n{text}\n```", 0)
        for summary in hparams_summary(hparams, {"val/dice/foreground": 0.0}):
            self.writer.file_writer.add_summary(summary)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


class Throughput:
    """Images/s, megapixels/s and the fraction of wall time spent waiting for data, per log interval."""

    def __init__(self, world_size: int, device: torch.device) -> None:
        self.world_size = world_size
        self.device = device
        self.reset()

    def reset(self) -> None:
        """A new interval: clock, counts and the memory peak (after validation too, which is not training)."""
        reset_peak_memory(self.device)
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.images = 0
        self.pixels = 0

    def add(self, images: int, pixels: int, data_wait: float) -> None:
        self.images += images
        self.pixels += pixels
        self.data_wait += data_wait

    def report(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        per_device_ips = self.images / elapsed
        per_device_mpx = self.pixels / elapsed / 1e6
        out = {
            "images_per_s": per_device_ips * self.world_size,
            "images_per_s_per_device": per_device_ips,
            "megapixels_per_s": per_device_mpx * self.world_size,
            "megapixels_per_s_per_device": per_device_mpx,
            "data_wait_fraction": min(1.0, self.data_wait / elapsed),
            "peak_memory_gb": peak_memory_gb(self.device),
        }
        self.reset()
        return out


class IntervalStats:
    """Everything `train/*` reports for one log interval; `report` is collective (all ranks call it)."""

    def __init__(self, env: DistEnv) -> None:
        self.env = env
        self.throughput = Throughput(env.world_size, env.device)
        self.loss_sum = torch.zeros((), device=env.device)
        self.loss_count = 0
        self.skipped = torch.zeros((), dtype=torch.float64, device=env.device)  # since the (re)start
        self.retries = torch.zeros((), dtype=torch.float64, device=env.device)  # shard server retries, too

    def prepare(self, amp_dtype: torch.dtype | None) -> None:
        """Measure the device peak (on CPU a ~0.3 s matmul) now, not inside the first timed interval."""
        if self.env.is_main:
            from unetdist.model.peak import peak_flops

            peak_flops(self.env.device, amp_dtype or torch.float32)

    def add(self, batch: dict[str, Any], out: dict[str, torch.Tensor], data_wait: float) -> None:
        image = batch["image"]
        self.throughput.add(image.shape[0], image.shape[0] * image.shape[-2] * image.shape[-1], data_wait)
        self.loss_sum += out["loss"].float()
        self.loss_count += 1
        self.skipped += int(batch.get("skipped", 0))
        self.retries += int(batch.get("retries", 0))

    def report(self, out: dict[str, torch.Tensor], epoch: int, flops_per_image: tuple[int, int],
               amp_dtype: torch.dtype | None) -> dict[str, float]:
        """Interval figures; ``flops_per_image`` is (model, hardware) FLOPs, see :func:`step_flops_per_image`."""
        env = self.env
        values = {"loss": float(all_reduce_mean(env, self.loss_sum)) / max(self.loss_count, 1),
                  "lr": float(out["lr"]), "grad_norm": float(out["grad_norm"]), "epoch": float(epoch)}
        if "loss_scale" in out:
            values["loss_scale"] = float(out["loss_scale"])
        values.update(self.throughput.report())
        values["peak_memory_gb"] = all_reduce_max(env, values["peak_memory_gb"])
        values["data_skipped"] = float(all_reduce_mean(env, self.skipped)) * env.world_size
        values["data_retries"] = float(all_reduce_mean(env, self.retries)) * env.world_size
        if env.is_main:
            model, hardware = flops_per_image
            ips = values["images_per_s_per_device"]
            values["mfu"] = model_flops_utilisation(ips, model, env.device, amp_dtype)
            values["hfu"] = model_flops_utilisation(ips, hardware, env.device, amp_dtype)
        self.loss_sum.zero_()
        self.loss_count = 0
        return values


def step_flops_per_image(model: dict[str, Any], height: int, width: int, checkpointing: str) -> tuple[int, int]:
    """(model FLOPs, hardware FLOPs) of one image's training step (analytic count).

    Model FLOPs are forward + backward: what the model needs, the numerator of MFU (model FLOP
    utilisation). Hardware FLOPs add activation checkpointing's recomputation: what the device
    executes, the numerator of HFU (hardware FLOP utilisation). They are equal without checkpointing.
    """
    return (train_step_flops_for(model, height, width, 1, "none"),
            train_step_flops_for(model, height, width, 1, checkpointing))


def model_flops_utilisation(images_per_s_per_device: float, flops_per_image: int, device: torch.device,
                            amp_dtype: torch.dtype | None) -> float:
    """Achieved FLOP/s (``flops_per_image``: model FLOPs for MFU, hardware FLOPs for HFU) over the device's peak."""
    from unetdist.model.peak import peak_flops

    return images_per_s_per_device * flops_per_image / peak_flops(device, amp_dtype or torch.float32)


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU allocation, or peak resident set size of this process on CPU, since the last reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:  # VmHWM can be reset (below); ru_maxrss is the lifetime peak
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:", 1)[1].split()[0]) / 2**20  # kilobytes
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak, so each log interval reports its own (not the process lifetime's, validation included)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: reset the peak resident set size
    except OSError:
        pass  # other systems: the lifetime peak


# Class colours (RGB, 0-1): background black, then colours far apart, so a boundary class never looks like
# the image's grey and neighbouring class ids never look alike. More classes cycle through hues.
PALETTE = np.array([(0.0, 0.0, 0.0), (0.0, 0.8, 1.0), (1.0, 0.85, 0.0), (1.0, 0.2, 0.6), (0.3, 1.0, 0.3),
                    (1.0, 0.5, 0.0), (0.6, 0.4, 1.0), (1.0, 1.0, 1.0)], dtype=np.float32)


def class_colours(num_classes: int) -> np.ndarray:
    """`num_classes` x 3 RGB colours in [0, 1], all different."""
    if num_classes <= len(PALETTE):
        return PALETTE[:num_classes]
    import colorsys

    extra = num_classes - len(PALETTE)
    hues = np.array([colorsys.hsv_to_rgb((k + 0.5) / extra, 0.7, 0.9) for k in range(extra)], dtype=np.float32)
    return np.concatenate([PALETTE, hues])


class GridSamples:
    """Up to `keep` validation tiles for the picture, those with foreground first (an empty tile shows nothing)."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.foreground: list[torch.Tensor] = []
        self.empty: list[torch.Tensor] = []

    @property
    def full(self) -> bool:
        return len(self.foreground) >= self.keep

    def offer(self, image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor) -> None:
        """A batch: image [B, C, H, W], label and prediction [B, H, W]; keeps copies on the CPU."""
        for i in range(label.shape[0]):
            if self.full:
                return
            has_foreground = bool((label[i] > 0).any())
            target = self.foreground if has_foreground else self.empty
            if has_foreground or len(self.empty) < self.keep:
                target.append(torch.stack([image[i, 0].float(), label[i].float(), pred[i].float()]).cpu())

    def samples(self) -> list[torch.Tensor]:
        return (self.foreground + self.empty)[: self.keep]


def prediction_grid(samples: list[torch.Tensor], num_classes: int) -> np.ndarray:
    """Rows of (input in grey, target, prediction in class colours) as one H x W x 3 RGB picture in [0, 1]."""
    colours = class_colours(num_classes)
    rows = []
    for sample in samples:
        image, target, pred = sample[0].numpy(), sample[1].numpy(), sample[2].numpy()
        lo, hi = np.percentile(image, [0.5, 99.5])
        image = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
        grey = np.repeat(image[..., None], 3, axis=2)
        gap = np.ones((image.shape[0], 2, 3), dtype=np.float32)
        painted = [colours[np.clip(m.astype(np.int64), 0, num_classes - 1)] for m in (target, pred)]
        rows.append(np.concatenate([grey, gap, painted[0], gap, painted[1]], axis=1))
        rows.append(np.ones((2, rows[-1].shape[1], 3), dtype=np.float32))
    return np.concatenate(rows[:-1], axis=0).astype(np.float32)


def save_png(grid: np.ndarray, path: Path) -> None:
    """An H x W x 3 grid in [0, 1] as an 8-bit RGB PNG."""
    from PIL import Image

    Image.fromarray((np.clip(grid, 0, 1) * 255).round().astype(np.uint8), mode="RGB").save(path)
