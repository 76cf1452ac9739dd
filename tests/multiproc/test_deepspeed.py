"""Real DeepSpeed on 2 gloo processes: ZeRO 0-3 resume, equivalence with DDP, accumulation, bf16, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.multiproc.spawn import spawn
from unetdist.config import load_config

pytestmark = pytest.mark.slow

BASE = ["model.base_width=4", "model.depth=2", "train.lr=0.01", "train.warmup_steps=2", "train.steps=6",
        "train.grad_clip=1.0", "data.batch_size=4", "run.seed=3"]


def _rank_batches(rank: int, steps: int, size: int = 32, batch: int = 4) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1000 + rank)
    out = []
    for _ in range(steps):
        image = torch.randn(batch, 1, size, size, generator=gen)
        out.append({"image": image, "label": (image[:, 0] > 0.2).long()})
    return out


def _losses(trainer, batches) -> list[float]:
    return [float(trainer.train_step(b)["loss"]) for b in batches]


def _zero_worker(out: str, stage: int, ckpt_dir: str) -> None:
    from unetdist.parallel.env import destroy_distributed, init_distributed
    from unetdist.train.trainer import build_trainer

    env = init_distributed()
    try:
        batches = _rank_batches(env.rank, 6)
        ddp = _losses(build_trainer(load_config(None, BASE), env), batches[:5])
        cfg = load_config(None, BASE + ["parallel.backend=deepspeed", f"parallel.deepspeed.zero_stage={stage}"])
        unbroken = _losses(build_trainer(cfg, env), batches)
        first = build_trainer(cfg, env)
        head = _losses(first, batches[:3])
        first.save(Path(ckpt_dir), {"data": {}})
        second = build_trainer(cfg, env)
        second.load(Path(ckpt_dir) / "step_000000003")
        tail = _losses(second, batches[3:])
        if env.is_main:
            Path(out).write_text(json.dumps({"ddp": ddp, "unbroken": unbroken, "resumed": head + tail,
                                             "step": second.step}))
    finally:
        destroy_distributed()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_resumes_exactly_and_matches_ddp(tmp_path: Path, stage: int) -> None:
    out = tmp_path / "losses.json"
    spawn(_zero_worker, 2, str(out), stage, str(tmp_path / "ckpt"))
    r = json.loads(out.read_text())
    assert r["step"] == 6
    assert r["resumed"] == pytest.approx(r["unbroken"], rel=1e-6, abs=1e-6)
    rel = 1e-4 if stage == 3 else 1e-5
    assert r["unbroken"][:5] == pytest.approx(r["ddp"], rel=rel)
    assert r["unbroken"][-1] < r["unbroken"][0], "no learning happened"
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_000000003"
    assert not list((tmp_path / "ckpt").glob("*.tmp"))


ACCUM = ["model.norm=group", "train.optimizer=sgd", "train.momentum=0.9", "train.lr=0.05", "train.warmup_steps=0"]


def _accum_worker(out: str, backend_overrides: list[str]) -> None:
    from unetdist.parallel.env import destroy_distributed, init_distributed
    from unetdist.train.trainer import build_trainer

    env = init_distributed()
    try:
        batches = _rank_batches(env.rank, 2)
        states = {}
        for accum in (1, 2):
            cfg = load_config(None, BASE + ACCUM + backend_overrides + [f"train.grad_accum={accum}"])
            trainer = build_trainer(cfg, env)
            _losses(trainer, batches)
            module = trainer.engine.eval_module()
            states[accum] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        if env.is_main:
            torch.save(states, out)
    finally:
        destroy_distributed()


@pytest.mark.parametrize("backend", [[], ["parallel.backend=deepspeed", "parallel.deepspeed.zero_stage=2"]],
                         ids=["ddp", "deepspeed-zero2"])
def test_two_micro_steps_equal_one_step_of_twice_the_batch(tmp_path: Path, backend: list[str]) -> None:
    out = tmp_path / "states.pt"
    spawn(_accum_worker, 2, str(out), backend)
    states = torch.load(out)
    for key, value in states[1].items():
        torch.testing.assert_close(states[2][key], value, rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")


def _bf16_worker(out: str) -> None:
    from unetdist.parallel.env import destroy_distributed, init_distributed
    from unetdist.train.trainer import build_trainer

    env = init_distributed()
    try:
        cfg = load_config(None, BASE + ["parallel.backend=deepspeed", "parallel.deepspeed.zero_stage=2",
                                        "train.precision=bf16", "train.steps=20", "train.lr=0.02"])
        losses = _losses(build_trainer(cfg, env), _rank_batches(env.rank, 20, size=16))
        if env.is_main:
            Path(out).write_text(json.dumps(losses))
    finally:
        destroy_distributed()


def test_bf16_learns_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "bf16.json"
    spawn(_bf16_worker, 2, str(out))
    losses = json.loads(out.read_text())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def _export_worker(out: str, ckpt_dir: str, model_file: str) -> None:
    from unetdist.parallel.collectives import barrier
    from unetdist.parallel.env import destroy_distributed, init_distributed
    from unetdist.train.export import export_model
    from unetdist.train.trainer import build_trainer

    env = init_distributed()
    try:
        cfg = load_config(None, BASE + ["parallel.backend=deepspeed", "parallel.deepspeed.zero_stage=3"])
        trainer = build_trainer(cfg, env)
        _losses(trainer, _rank_batches(env.rank, 3))
        trainer.save(Path(ckpt_dir), {"data": {"channels": 1}})
        probe = torch.randn(2, 1, 40, 44, generator=torch.Generator().manual_seed(7))
        module = trainer.engine.eval_module().eval()
        with torch.no_grad():
            engine_pred = module(probe)
        if env.is_main:
            export_model(Path(ckpt_dir), Path(model_file))
            torch.save(engine_pred, out)
        barrier(env)
    finally:
        destroy_distributed()


def test_zero3_export_loads_into_plain_unet_with_same_predictions(tmp_path: Path) -> None:
    from unetdist.model import UNet

    out, model_file = tmp_path / "pred.pt", tmp_path / "model.pt"
    spawn(_export_worker, 2, str(out), str(tmp_path / "ckpt"), str(model_file))
    saved = torch.load(model_file, weights_only=True)
    assert saved["format"] == "unetdist-model-v1" and saved["step"] == 3
    model = UNet(**saved["model_hparams"])
    model.load_state_dict(saved["model"])
    model.eval()
    probe = torch.randn(2, 1, 40, 44, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(model(probe), torch.load(out), rtol=1e-6, atol=1e-6)


def _checkpointing_worker(out: str) -> None:
    from unetdist.parallel.env import destroy_distributed, init_distributed
    from unetdist.train.trainer import build_trainer

    env = init_distributed()
    try:
        results = {}
        for policy in ("none", "all"):
            cfg = load_config(None, BASE + ["parallel.backend=deepspeed", "parallel.deepspeed.zero_stage=2",
                                            f"train.activation_checkpointing={policy}"])
            trainer = build_trainer(cfg, env)
            losses = _losses(trainer, _rank_batches(env.rank, 2))
            buffers = {k: v.clone() for k, v in trainer.module.named_buffers()}
            results[policy] = {"losses": losses, "buffers": buffers}
        if env.is_main:
            torch.save(results, out)
    finally:
        destroy_distributed()


def test_activation_checkpointing_under_deepspeed_changes_nothing_but_memory(tmp_path: Path) -> None:
    out = tmp_path / "ckpt.pt"
    spawn(_checkpointing_worker, 2, str(out))
    r = torch.load(out)
    assert r["all"]["losses"] == pytest.approx(r["none"]["losses"], rel=1e-6)
    assert r["none"]["buffers"]["inc.double_conv.1.num_batches_tracked"].item() == 2
    for key, value in r["none"]["buffers"].items():
        torch.testing.assert_close(r["all"]["buffers"][key], value, rtol=1e-5, atol=0, msg=lambda m: f"{key}: {m}")
