"""Training batches: embedding-cache rows -> :class:`Sample` (embedding, soft target, stored prompt in the
model-input frame) and :class:`BatchStream`, endless local batches over chained epochs with an exact,
resumable position, identical on every rank (docs/METHOD.md §3 for the prompt draws).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from pipeline.config import Params
from pipeline.data import rle
from pipeline.data.embedding_reader import EmbeddingDataset
from pipeline.inference.prompts import Prompt
from pipeline.modeling.transforms import mask_to_input_frame
from pipeline.prompts.synthesis import ModelFrame
from pipeline.prompts.tables import TrainRow
from pipeline.training import ddp


@dataclass
class Sample:
    """One training row, ready for the model: embedding, soft target, prompt in the model-input frame."""

    view_id: str
    epoch: int
    embedding: torch.Tensor  # float32 [C, g, g]
    target: torch.Tensor  # float32 [S, S] soft GT in the padded model-input frame
    prompt: Prompt | None  # model-input frame; None: no stored prompt for this view (skipped, counted)


class TrainSamples(IterableDataset):
    """Wraps one epoch of :class:`EmbeddingDataset`: decodes the GT, builds the target and the prompt.

    Runs inside DataLoader workers when ``train.num_workers > 0`` (the embedding reader splits the
    stream across workers itself).
    """

    def __init__(self, rows: EmbeddingDataset, prompts: dict[str, list[TrainRow]], frame: ModelFrame,
                 epoch: int, mask_logits: tuple[float, float]) -> None:
        super().__init__()
        self.rows, self.prompts, self.frame, self.epoch, self.mask_logits = rows, prompts, frame, epoch, mask_logits

    def __iter__(self) -> Iterator[Sample]:
        for row in self.rows:
            yield make_sample(row, self.prompts, self.frame, self.epoch, self.mask_logits)


def make_sample(row: dict[str, Any], prompts: dict[str, list[TrainRow]], frame: ModelFrame, epoch: int,
                mask_logits: tuple[float, float]) -> Sample:
    """An embedding-cache row -> :class:`Sample` (prompt draw ``epoch mod n``, in the model-input frame)."""
    vid = row["view_id"]
    hw = (int(row["height"]), int(row["width"]))
    mask = rle.decode(row["mask_rle"], *hw)
    target = mask_to_input_frame(mask, frame.img_size, frame.img_size, frame.mode)
    draws = prompts.get(vid)
    prompt = None
    if draws:
        stored = Prompt.from_row(draws[epoch % len(draws)], mask_logits=mask_logits, lowres_side=frame.lowres_side)
        prompt = stored.in_input_frame(hw, frame.img_size, frame.mode)
    return Sample(vid, epoch, row["embedding"], target, prompt)


def _collate(batch: list[Sample]) -> list[Sample]:
    return batch


class BatchStream:
    """Endless local batches over chained epochs, with an exact, resumable position (epoch, batch).

    Every epoch yields ``min_rank_rows // local_batch`` full batches on every rank (the reader's
    recommendation), so ranks stay in step and the last partial batch is dropped.
    """

    def __init__(self, params: Params, embeddings: Path, prompts: dict[str, list[TrainRow]], frame: ModelFrame,
                 ctx: ddp.DistContext, local_batch: int, epoch: int = 0, batch: int = 0) -> None:
        self.params, self.embeddings, self.prompts, self.frame = params, embeddings, prompts, frame
        self.ctx, self.local_batch = ctx, local_batch
        self.epoch, self.batch = epoch, batch

    def _dataset(self, epoch: int) -> EmbeddingDataset:
        cfg = self.params.train
        return EmbeddingDataset(self.embeddings, "train", shuffle_buffer=cfg.shuffle_buffer, seed=self.params.seed,
                                rank=self.ctx.rank, world_size=self.ctx.world_size, epoch=epoch,
                                partition=cfg.ddp_partition, batch_size=self.local_batch)

    def batches_per_epoch(self, epoch: int = 0) -> int:
        return self._dataset(epoch).min_rank_rows() // self.local_batch

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def __iter__(self) -> Iterator[list[Sample]]:
        mask_logits = tuple(self.params.prompts.coarse_mask_logits)
        while True:
            rows = self._dataset(self.epoch)
            n = rows.min_rank_rows() // self.local_batch
            if n == 0:
                raise ValueError(f"{self.embeddings}: {rows.min_rank_rows()} training views per rank, fewer than one "
                                 f"local batch of {self.local_batch}; lower train.batch_size")
            workers = self.params.train.num_workers
            samples = TrainSamples(rows, self.prompts, self.frame, self.epoch, mask_logits)  # type: ignore[arg-type]
            loader = DataLoader(samples, batch_size=self.local_batch, drop_last=True, collate_fn=_collate,
                                num_workers=workers, persistent_workers=False)
            it = iter(loader)
            for _ in range(self.batch):  # resumed mid-epoch: replay (and drop) the batches already trained on
                next(it)
            while self.batch < n:
                batch = next(it)
                self.batch += 1
                yield batch
            del it, loader
            self.epoch, self.batch = self.epoch + 1, 0


__all__ = ["BatchStream", "Sample", "TrainSamples", "make_sample"]
