"""Samples -> one batch dict, the contract of DESIGN.md: image, text, present, targets, target_mask, index."""

import torch


def collate(samples: list[dict], pad_id: int = 0) -> dict:
    batch = {"index": torch.tensor([sample["index"] for sample in samples])}
    size = len(samples)
    if "image" in samples[0]:
        batch["image"] = torch.stack([sample["image"] for sample in samples])
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
    batch["present"] = {modality: torch.tensor([sample["present"][modality] for sample in samples])
                        for modality in samples[0]["present"]}
    batch["targets"] = {task: torch.tensor([sample["targets"][task] for sample in samples])
                        for task in samples[0]["targets"]}
    batch["target_mask"] = {task: torch.tensor([sample["target_mask"][task] for sample in samples])
                            for task in samples[0]["target_mask"]}
    return batch
