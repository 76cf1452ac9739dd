"""What a person watching the run sees: TensorBoard on rank 0, throughput, progress, pictures.

Only rank 0 writes; other ranks get a writer that does nothing, so callers never branch on rank.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetdist.parallel.collectives import all_reduce_max, all_reduce_mean
from unetdist.parallel.env import DistEnv

log = logging.getLogger(__name__)


class RunLogger:
    """TensorBoard scalars/images plus a progress bar (terminal) or log lines (files, pipes)."""

    def __init__(self, tb_dir: Path | None, total_steps: int, start_step: int) -> None:
        self.writer = None
        self.bar = None
        if tb_dir is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a crashed run logged after its last checkpoint, so resumed curves have no repeats.
        self.writer = SummaryWriter(log_dir=str(tb_dir), purge_step=start_step + 1 if start_step > 0 else None)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    @property
    def active(self) -> bool:
        return self.writer is not None

    def scalars(self, step: int, values: dict[str, float], prefix: str) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def progress(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        text = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(text, refresh=True)
        else:
            log.info("step %d %s", step, text)

    def message(self, text: str) -> None:
        if self.writer is None:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            log.info(text)

    def image_grid(self, step: int, grid: np.ndarray) -> None:
        if self.writer is not None:
            self.writer.add_image("val/input_target_prediction", grid, step, dataformats="HW")

    def config(self, text: str, hparams: dict[str, float | int | str | bool]) -> None:
        """The resolved config as text, and the key settings in TensorBoard's HPARAMS tab (same run folder)."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        self.writer.add_text("config", f"```\n{text}\n```", 0)
        for summary in hparams_summary(hparams, {"val/dice/foreground": 0.0}):
            self.writer.file_writer.add_summary(summary)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


class Throughput:
    """Images/s, megapixels/s and the fraction of wall time spent waiting for data, per log interval."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.images = 0
        self.pixels = 0

    def add(self, images: int, pixels: int, data_wait: float) -> None:
        self.images += images
        self.pixels += pixels
        self.data_wait += data_wait

    def report(self, device: torch.device) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        per_device_ips = self.images / elapsed
        per_device_mpx = self.pixels / elapsed / 1e6
        out = {
            "images_per_s": per_device_ips * self.world_size,
            "images_per_s_per_device": per_device_ips,
            "megapixels_per_s": per_device_mpx * self.world_size,
            "megapixels_per_s_per_device": per_device_mpx,
            "data_wait_fraction": min(1.0, self.data_wait / elapsed),
            "peak_memory_gb": peak_memory_gb(device),
        }
        self.reset()
        return out


class IntervalStats:
    """Everything `train/*` reports for one log interval; `report` is collective (all ranks call it)."""

    def __init__(self, env: DistEnv) -> None:
        self.env = env
        self.throughput = Throughput(env.world_size)
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

    def report(self, out: dict[str, torch.Tensor], epoch: int, flops_per_image: int,
               amp_dtype: torch.dtype | None) -> dict[str, float]:
        env = self.env
        values = {"loss": float(all_reduce_mean(env, self.loss_sum)) / max(self.loss_count, 1),
                  "lr": float(out["lr"]), "grad_norm": float(out["grad_norm"]), "epoch": float(epoch)}
        if "loss_scale" in out:
            values["loss_scale"] = float(out["loss_scale"])
        values.update(self.throughput.report(env.device))
        values["peak_memory_gb"] = all_reduce_max(env, values["peak_memory_gb"])
        values["data_skipped"] = float(all_reduce_mean(env, self.skipped)) * env.world_size
        values["data_retries"] = float(all_reduce_mean(env, self.retries)) * env.world_size
        if env.is_main:
            values["mfu"] = model_flops_utilisation(values["images_per_s_per_device"], flops_per_image,
                                                    env.device, amp_dtype)
        self.loss_sum.zero_()
        self.loss_count = 0
        return values


def model_flops_utilisation(images_per_s_per_device: float, flops_per_image: int, device: torch.device,
                            amp_dtype: torch.dtype | None) -> float:
    """Achieved model FLOP/s (analytic count, recomputation included) over the device's peak."""
    from unetdist.model.peak import peak_flops

    return images_per_s_per_device * flops_per_image / peak_flops(device, amp_dtype or torch.float32)


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU allocation, or peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def prediction_grid(samples: list[torch.Tensor], num_classes: int) -> np.ndarray:
    """Rows of (input, target, prediction), scaled to [0, 1], as one grayscale picture."""
    rows = []
    for sample in samples:
        image, target, pred = sample[0].numpy(), sample[1].numpy(), sample[2].numpy()
        lo, hi = np.percentile(image, [0.5, 99.5])
        image = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
        scale = max(num_classes - 1, 1)
        gap = np.ones((image.shape[0], 2), dtype=np.float32)
        rows.append(np.concatenate([image, gap, target / scale, gap, pred / scale], axis=1))
        rows.append(np.ones((2, rows[-1].shape[1]), dtype=np.float32))
    return np.concatenate(rows[:-1], axis=0).astype(np.float32)


def save_png(grid: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray((grid * 255).round().astype(np.uint8)).save(path)
