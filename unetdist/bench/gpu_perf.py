"""The GPU check's measuring sections: training table, memory headroom, prediction, loader feeding rate.

Why this module exists: the figures a GPU session must bring back (MFU in bf16 at 512 x 512 next
to the reference trainer, the largest batch per checkpointing policy, bf16 prediction's agreement
with fp32 and its speed, whether the configured loader workers keep up), each in its own process
with its own time limit (see `gpu_check.py`). `dry` mode runs them at tiny sizes on CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch

from unetdist.bench.gpu_sections import REPO, Ctx, Result, _synthetic_batches


def _bench(ctx: Ctx, only: str, deadline_s: float) -> dict[str, Any]:
    preset, device = ("gpu", "cuda") if ctx.gpu else ("tiny", "cpu")
    out = ctx.out / "bench"
    argv = [sys.executable, "-m", "unetdist.cli", "bench", "--preset", preset, "--device", device, "--out", str(out),
            "--data-dir", str(ctx.data / f"bench-{preset}"), "--only", only, "--deadline-s", str(deadline_s)]
    if not ctx.gpu:
        argv += ["--memory-method", "meta"]
    proc = subprocess.run(argv, cwd=REPO, text=True, capture_output=True)
    (ctx.out / "bench.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"unetdist bench --only {only} exited {proc.returncode}: {proc.stderr[-1500:]}")
    return json.loads((out / "bench.json").read_text())


def section_table(ctx: Ctx) -> Result:
    """The training table at 512 x 512 bf16 (ours vs the reference trainer, levers; compile rows fall back)."""
    report = _bench(ctx, "reference,levers", 75 if ctx.gpu else 10)
    rows = report["rows"]
    best = max(rows, key=lambda r: r["images_per_s_per_device"])
    reference = [r for r in rows if r.get("trainer") == "reference"]
    figures = {"best_row": best["name"], "best_mfu": best["mfu"], "best_hfu": best.get("hfu"),
               "best_images_per_s": best["images_per_s_per_device"],
               "reference_images_per_s": max((r["images_per_s_per_device"] for r in reference), default=None),
               "rows": len(rows), "skipped": [s["row"] for s in report["skipped"]],
               "comparisons": {c["name"]: c["ratio"] for c in report["comparisons"]}}
    return {"passed": bool(rows) and all(r["mfu"] > 0 for r in rows), "figures": figures,
            "detail": "unetdist bench (reference, levers); full table in bench/bench.json"}


def section_memory(ctx: Ctx) -> Result:
    """Memory headroom: the largest batch per checkpointing policy, by real allocation on the GPU."""
    report = _bench(ctx, "memory", 35 if ctx.gpu else 10)
    memory = report.get("memory") or {}
    policies = {name: fig.get("max_batch") for name, fig in memory.get("policies", {}).items()}
    return {"passed": bool(policies) and all((b or 0) > 0 for b in policies.values()),
            "figures": {"method": memory.get("method"), "max_batch": policies},
            "detail": "largest batch of 512 x 512 tiles per checkpointing policy"}


def _trained_model(ctx: Ctx) -> torch.nn.Module:
    """A small UNet trained for a few steps, so its predictions are confident and comparable."""
    from unetdist.model import UNet
    from unetdist.train.metrics import segmentation_loss

    torch.manual_seed(0)
    model = UNet(in_channels=1, num_classes=2, base_width=16 if ctx.gpu else 4, depth=4 if ctx.gpu else 2).to(ctx.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    for batch in _synthetic_batches(ctx, 40 if ctx.gpu else 10, 64 if ctx.gpu else 32, 8):
        loss = segmentation_loss(model(batch["image"].to(ctx.device)), batch["label"].to(ctx.device), 0.5, None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def section_predict(ctx: Ctx) -> Result:
    """Prediction in bf16 vs fp32: the same labels (>= 99.5% of pixels) and megapixels/s of each."""
    from unetdist.data.manifest import IntensityStats
    from unetdist.infer.predict import PredictOptions, SlidingWindowPredictor

    model = _trained_model(ctx)
    stats = IntensityStats(low=(-4.0,), high=(4.0,), clipped_mean=(0.0,), clipped_std=(1.0,))
    side = 2048 if ctx.gpu else 96
    image = np.random.default_rng(0).normal(size=(1, side, side)).astype(np.float32)
    results = {}
    for precision in ("fp32", "bf16"):
        options = PredictOptions(tile=512 if ctx.gpu else 32, overlap=64 if ctx.gpu else 8, batch_size=8,
                                 precision=precision)
        predictor = SlidingWindowPredictor(model, stats, options, ctx.device)
        predictor.predict(image[:, : side // 4, : side // 4])  # warm-up: kernels, autotuning
        start = time.perf_counter()
        logits = predictor.predict(image)
        seconds = time.perf_counter() - start
        results[precision] = (logits, side * side / seconds / 1e6)
    (fp32, mp32), (bf16, mp16) = results["fp32"], results["bf16"]
    agree = float((fp32.argmax(0) == bf16.argmax(0)).float().mean())
    prob = float((fp32.softmax(0) - bf16.softmax(0)).abs().max())
    return {"passed": agree >= 0.995, "figures": {"label_agreement": agree, "max_prob_diff": prob,
                                                  "megapixels_per_s_fp32": mp32, "megapixels_per_s_bf16": mp16,
                                                  "image": f"{side}x{side}"},
            "detail": "sliding-window prediction, bf16 vs fp32 (agreement >= 0.995)"}


def section_loader(ctx: Ctx) -> Result:
    """The training loader with the GPU config's workers: tiles/s it delivers to one rank."""
    from unetdist.config import load_config
    from unetdist.data.default import ensure_dataset
    from unetdist.data.stream import batches_per_epoch, open_manifest, run_loader

    config = REPO / "configs/gpu-8x.yaml"
    size = [] if ctx.gpu else ["data.shard.tile=32", "data.synth.height=96", "data.synth.width=96",
                               "data.batch_size=4", "data.workers=1", "data.shuffle_buffer=16"]
    cfg = load_config(config, [f"data.root={ctx.data / 'loader'}", "data.generate=true", "data.synth.images=16",
                               f"run.dir={ctx.out}", *size])
    manifest = open_manifest(ensure_dataset(cfg.data, cfg.model.num_classes), cfg.data)
    budget = 12.0 if ctx.gpu else 3.0
    count, tiles, start = 0, 0, time.perf_counter()
    # epoch after epoch through one loader, as in training
    for batch in run_loader(cfg.data, manifest, rank=0, world_size=1, seed=0, stop_step=10**12, pin_memory=ctx.gpu):
        tiles += int(batch["image"].shape[0])
        count += 1
        if time.perf_counter() - start >= budget:
            break
    seconds = time.perf_counter() - start
    epoch = -(-count // batches_per_epoch(cfg.data, manifest, 1))  # epochs begun
    rate = tiles / seconds if seconds > 0 else 0.0
    return {"passed": tiles > 0, "figures": {"workers": cfg.data.workers, "tile": manifest.tile, "tiles": tiles,
                                             "tiles_per_s": rate, "batches": count, "epochs": epoch},
            "detail": f"run_loader with {config.name}'s data.workers={cfg.data.workers}, one rank"}
