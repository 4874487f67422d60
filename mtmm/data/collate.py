"""Samples -> one batch dict, the contract of DESIGN.md: image, text, present, targets, target_mask, index (and,
with the feature cache, `features`: the precomputed encoder outputs of the batch's samples)."""

import torch


def pad_token_ids(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Token id lists -> input_ids and attention_mask [B, T], padded to the longest row of this batch (not a global
    maximum: short captions stay cheap)."""
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


def collate(samples: list[dict], pad_id: int = 0, cached: dict[str, dict[str, torch.Tensor]] | None = None) -> dict:
    """`cached`: modality -> the split's cached encoder outputs (feature cache); the samples of such a modality
    carry no input, and the batch gets their rows under `features` instead."""
    batch = {"index": torch.tensor([sample["index"] for sample in samples])}
    if cached:
        batch["features"] = {modality: cached_rows(tensors, batch["index"]) for modality, tensors in cached.items()}
    if "image" in samples[0]:
        batch["image"] = torch.stack([sample["image"] for sample in samples])
    if "input_ids" in samples[0]:
        batch["text"] = pad_token_ids([sample["input_ids"] for sample in samples], pad_id)
    batch["present"] = {modality: torch.tensor([sample["present"][modality] for sample in samples])
                        for modality in samples[0]["present"]}
    batch["targets"] = {task: torch.tensor([sample["targets"][task] for sample in samples])
                        for task in samples[0]["targets"]}
    batch["target_mask"] = {task: torch.tensor([sample["target_mask"][task] for sample in samples])
                            for task in samples[0]["target_mask"]}
    return batch
