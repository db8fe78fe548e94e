"""Distil a student with Hugging Face `Trainer`, from the teacher cache `dvc repro` wrote.

    pip install -e ".[hf]"; python examples/hf_trainer.py [CACHE] [EPOCHS]

`compute_loss` is the one override: the batch holds the teacher's cached logits beside the
inputs, so the teacher is never loaded. The recipe of params.yaml's train_student.
"""

import sys
import tempfile

import numpy as np
import torch
import transformers

import pipeline as kd


class DistillTrainer(transformers.Trainer):
    def __init__(self, *args, loss_fn, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_fn = loss_fn

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(inputs["inputs"])
        loss = self.loss_fn(logits, inputs["teacher"], inputs["labels"])
        return (loss, logits) if return_outputs else loss


def main(cache: str = "caches/train.zarr", epochs: int = 60, seed: int = 0) -> float:
    transformers.set_seed(seed)
    train, test = kd.load_transfer_set("digits:train"), kd.load_transfer_set("digits:test")
    kept = np.random.default_rng(seed).permutation(len(train))[: round(0.1 * len(train))]
    train.labels = np.where(np.isin(np.arange(len(train)), kept), train.labels, -1)
    data = kd.TeacherTargets(train, cache)
    student = kd.create_model("mlp", data.num_classes, train.input_shape, hidden=[256])
    args = transformers.TrainingArguments(  # params.yaml's train_student recipe
        output_dir=tempfile.mkdtemp(), num_train_epochs=epochs, per_device_train_batch_size=64,
        learning_rate=2e-3, weight_decay=1e-4, lr_scheduler_type="cosine", seed=seed,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        remove_unused_columns=False,  # keep "teacher" in the batch: compute_loss reads it
    )  # fmt: skip
    loss_fn = kd.distillation_loss("kd", temperature=4.0, alpha=0.9)
    DistillTrainer(model=student, args=args, train_dataset=data, loss_fn=loss_fn).train()

    student.cpu().eval()
    with torch.no_grad():
        predicted = student(torch.from_numpy(test.inputs)).argmax(1).numpy()
    accuracy = float((predicted == test.labels).mean())
    print(f"test accuracy {accuracy:.4f}")
    return accuracy


if __name__ == "__main__":
    main(*sys.argv[1:2], *map(int, sys.argv[2:3]))
