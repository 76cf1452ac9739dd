"""Read TensorBoard event files back, the way TensorBoard itself does."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def image_tags(tb_dir: Path) -> list[str]:
    acc = EventAccumulator(str(tb_dir), size_guidance={"images": 0})
    acc.Reload()
    return acc.Tags()["images"]


def hparams(tb_dir: Path) -> dict[str, object]:
    """The session-start hparams TensorBoard's HPARAMS tab shows for this run folder."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(tb_dir), size_guidance={"tensors": 0})
    acc.Reload()
    for content in acc.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            out: dict[str, object] = {}
            for key, value in data.session_start_info.hparams.items():
                kind = value.WhichOneof("kind")
                out[key] = getattr(value, kind)
            return out
    return {}
