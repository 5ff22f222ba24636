"""The loader's collate keeps whatever keys the samples carry (no key list in the core)."""

import torch

from ldmkit.data.decode import collate


def test_collate_stacks_tensors_numbers_and_lists_any_key():
    samples = [
        {"image": torch.full((1, 2, 2), float(i)), "label": i, "score": 0.5 * i, "caption": f"c{i}",
         "depth": torch.full((2, 2), i, dtype=torch.long), "__key__": f"k{i}"}
        for i in range(3)
    ]
    batch = collate(samples)
    assert batch["image"].shape == (3, 1, 2, 2) and batch["image"][2].max() == 2
    assert batch["label"].dtype == torch.long and batch["label"].tolist() == [0, 1, 2]
    assert batch["score"].dtype == torch.float32 and batch["score"].tolist() == [0.0, 0.5, 1.0]
    assert batch["caption"] == ["c0", "c1", "c2"] and batch["__key__"] == ["k0", "k1", "k2"]
    assert batch["depth"].shape == (3, 2, 2) and batch["depth"].dtype == torch.long
