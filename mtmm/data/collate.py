"""The last step of a batch: the dataset builds it whole (ManifestDataset.batch, the contract of DESIGN.md: image,
text, present, targets, target_mask, index); with the feature cache, the batch also gets `features`, the
precomputed encoder outputs of its samples."""

import torch


def pad_token_ids(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Token id lists -> input_ids and attention_mask [B, T], padded to the longest row of this batch (not a global
    maximum: short captions stay cheap), as ManifestDataset.batch pads its texts."""
    length = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def cached_rows(cached: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch's rows of one modality's cached encoder outputs, cut to the batch's longest real sequence (real
    tokens come first), as pad_token_ids pads a batch's texts rather than the whole split's."""
    mask = cached["mask"][index]
    length = max(1, int(mask.sum(1).max()))
    return {"pooled": cached["pooled"][index], "tokens": cached["tokens"][index, :length], "mask": mask[:, :length]}


def finish_batch(batch: dict, cached: dict[str, dict[str, torch.Tensor]] | None = None) -> dict:
    """A DataLoader's collate_fn. `cached`: modality -> the split's cached encoder outputs (feature cache); the
    dataset loaded no input of such a modality, and the batch gets their rows under `features` instead."""
    if cached:
        batch["features"] = {modality: cached_rows(tensors, batch["index"]) for modality, tensors in cached.items()}
    return batch
