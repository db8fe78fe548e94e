"""Distil a student in your own PyTorch loop, from the teacher cache `dvc repro` wrote.

    python examples/plain_loop.py [CACHE] [EPOCHS]

The recipe of params.yaml's train_student (an MLP, labels for 10% of the rows, kd at T = 4,
AdamW with a cosine schedule, 60 epochs), written as any PyTorch user would write it.
"""

import sys

import numpy as np
import torch

import pipeline as kd


def main(cache: str = "caches/train.zarr", epochs: int = 60, seed: int = 0) -> float:
    torch.manual_seed(seed)
    train, test = kd.load_transfer_set("digits:train"), kd.load_transfer_set("digits:test")
    kept = np.random.default_rng(seed).permutation(len(train))[: round(0.1 * len(train))]
    train.labels = np.where(np.isin(np.arange(len(train)), kept), train.labels, -1)

    data = kd.TeacherTargets(train, cache)  # joined by sample id; other data is refused
    shuffle = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True, generator=shuffle)
    student = kd.create_model("mlp", data.num_classes, train.input_shape, hidden=[256])
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    loss_fn = kd.distillation_loss("kd", temperature=4.0, alpha=0.9)

    for _ in range(epochs):
        student.train()
        for batch in loader:
            loss = loss_fn(student(batch["inputs"]), batch["teacher"], batch["labels"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()

    student.eval()
    with torch.no_grad():
        predicted = student(torch.from_numpy(test.inputs)).argmax(1).numpy()
    accuracy = float((predicted == test.labels).mean())
    print(f"test accuracy {accuracy:.4f}")
    return accuracy


if __name__ == "__main__":
    main(*sys.argv[1:2], *map(int, sys.argv[2:3]))
