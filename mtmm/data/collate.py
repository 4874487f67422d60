"""Samples -> one batch dict, the contract of DESIGN.md: image, text, present, targets, target_mask, index."""

import torch


def collate(samples: list[dict], pad_id: int = 0) -> dict:
    batch = {"index": torch.tensor([sample["index"] for sample in samples])}
    size = len(samples)
    present = {}
    if "image" in samples[0]:
        batch["image"] = torch.stack([sample["image"] for sample in samples])
        present["image"] = torch.ones(size, dtype=torch.bool)
    if "input_ids" in samples[0]:
        # Pad to the longest text of this batch, not a global maximum: short captions stay cheap.
        length = max(len(sample["input_ids"]) for sample in samples)
        input_ids = torch.full((size, length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((size, length), dtype=torch.long)
        for row, sample in enumerate(samples):
            ids = sample["input_ids"]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        batch["text"] = {"input_ids": input_ids, "attention_mask": attention_mask}
        present["text"] = torch.ones(size, dtype=torch.bool)
    batch["present"] = present
    batch["targets"], batch["target_mask"] = {}, {}
    for task in samples[0]["targets"]:
        values = [sample["targets"][task] for sample in samples]
        # A sample without a label for this task keeps a placeholder 0 and is masked out of loss and metrics.
        batch["targets"][task] = torch.tensor([0 if value is None else value for value in values])
        batch["target_mask"][task] = torch.tensor([value is not None for value in values])
    return batch
