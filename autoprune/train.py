"""The training loop shared by base training and fine-tuning (with optional distillation).

SGD with Nesterov momentum, a cosine learning-rate schedule stepped per batch, weight decay on
conv/linear weights only (not on BN or biases). With ``teacher`` the loss is
``(1 - alpha) * CE + alpha * T^2 * KL(softmax(t/T) || softmax(s/T))`` (Hinton et al.).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import Batches, Dataset, Split
from .errors import UserError
from .progress import bar
from .threads import split_forward

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    seed: int = 0
    augment: bool = True
    kd_alpha: float = 0.9  # weight of the distillation term when a teacher is given
    kd_temperature: float = 4.0

    def __post_init__(self):
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise UserError(f"`--epochs` must be a positive integer, got {self.epochs!r}")
        if not self.lr > 0:
            raise UserError(f"`--lr` must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise UserError(f"`--weight-decay` must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise UserError(f"`--kd-alpha` must be in [0, 1], got {self.kd_alpha}")
        if not self.kd_temperature > 0:
            raise UserError(f"`--kd-temperature` must be > 0, got {self.kd_temperature}")


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, *, batch_size: int = 250,
             workers: int | None = None) -> float:
    """Top-1 accuracy in [0, 1]. Batches of 250 are ~3x faster here than one big batch; on the
    CPU, ``workers`` batches run at a time, one intra-op thread each (default: torch's threads,
    `--threads`; `threads.split_forward`). The model is only read: its threads share it."""
    if batch_size < 1:
        raise UserError(f"`--batch-size` must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    device = _device_of(model)

    def correct(_k, starts):
        n = 0
        for s in starts:
            x, y = split.x[s:s + batch_size].to(device), split.y[s:s + batch_size].to(device)
            n += (model(x).argmax(1) == y).sum().item()
        return n

    try:
        total = sum(split_forward(correct, range(0, len(split), batch_size),
                                  workers=workers if device.type == "cpu" else 1))
    finally:
        model.train(was_training)
    return total / max(1, len(split))


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def distillation_loss(student_logits, teacher_logits, targets, *, alpha: float, temperature: float):
    ce = F.cross_entropy(student_logits, targets)
    if alpha == 0.0:
        return ce
    t = temperature
    kd = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                  reduction="batchmean") * (t * t)
    return (1.0 - alpha) * ce + alpha * kd


def _param_groups(model: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_weight = name == "weight" and isinstance(module, (nn.Conv2d, nn.Linear))
            (decay if is_weight else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def train(model: nn.Module, data: Dataset, config: TrainConfig, *,
          teacher: nn.Module | None = None, progress: bool = False,
          resume_state: dict[str, Any] | None = None,
          on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train ``model`` in place; returns a history dict (per-epoch loss, train acc, val acc).

    Training runs where ``model``'s parameters are (the CLI's ``--train-device``); batches are
    drawn on the CPU, the same for every device, and moved there, and so is ``teacher``.
    ``on_epoch_end(epoch, state)`` receives a resumable state (model, optimizer, epoch, history)
    after every epoch; passing that state back as ``resume_state`` continues from there.
    """
    torch.manual_seed(config.seed)
    loader = Batches(data.train, config.batch_size, shuffle=True, augment=config.augment,
                     pad=data.pad, flip=data.flip, seed=config.seed)
    opt = torch.optim.SGD(_param_groups(model, config.weight_decay), lr=config.lr,
                          momentum=config.momentum, nesterov=True)
    total_steps = config.epochs * len(loader)
    history: dict[str, list] = {"loss": [], "train_acc": [], "val_acc": [], "epoch_s": []}
    start_epoch = 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        opt.load_state_dict(resume_state["optimizer"])
        start_epoch = int(resume_state["epoch"])
        history = {k: list(v) for k, v in resume_state["history"].items()}
        loader.epoch = start_epoch
    device = _device_of(model)
    if teacher is not None:
        teacher.to(device).eval()

    def lr_at(step: int) -> float:
        return 0.5 * config.lr * (1.0 + math.cos(math.pi * step / total_steps))

    with bar("train", total_steps, enabled=progress, completed=start_epoch * len(loader),
             fields="epoch {task.fields[epoch]} loss {task.fields[loss]} "
                    "acc {task.fields[acc]} val {task.fields[val]}") as pbar:
        for epoch in range(start_epoch, config.epochs):
            model.train()
            t0, seen, correct, loss_sum = time.perf_counter(), 0, 0, 0.0
            for i, (x, y) in enumerate(loader):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                step = epoch * len(loader) + i
                for group in opt.param_groups:
                    group["lr"] = lr_at(step)
                out = model(x)
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher(x)
                    loss = distillation_loss(out, t_out, y, alpha=config.kd_alpha,
                                             temperature=config.kd_temperature)
                else:
                    loss = F.cross_entropy(out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if not torch.isfinite(loss):
                    raise RuntimeError(f"training diverged at epoch {epoch + 1} (loss {loss})")
                seen += len(y)
                correct += (out.argmax(1) == y).sum().item()
                loss_sum += loss.item() * len(y)
                pbar.advance(epoch=f"{epoch + 1}/{config.epochs}",
                             loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
            val_acc = evaluate(model, data.val)
            history["loss"].append(loss_sum / seen)
            history["train_acc"].append(correct / seen)
            history["val_acc"].append(val_acc)
            history["epoch_s"].append(time.perf_counter() - t0)
            pbar.update(val=f"{val_acc:.4f}")
            log.info("epoch %d/%d loss %.4f train %.4f val %.4f (%.1f s)", epoch + 1,
                     config.epochs, history["loss"][-1], history["train_acc"][-1], val_acc,
                     history["epoch_s"][-1])
            if on_epoch_end is not None:
                # A copy on the CPU: the live tensors keep changing once training goes on, and
                # a state file must resume on any device.
                on_epoch_end(epoch + 1, _cpu_copy({
                    "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "epoch": epoch + 1, "history": history}))
    return history


def _cpu_copy(obj):
    """A copy of nested dicts, lists and tuples whose tensors are copied to the CPU once (the
    other leaves of a state dict are immutable scalars, strings and None)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def train_device(name: str) -> torch.device:
    """The device ``--train-device`` names, refused with a UserError where it is not there."""
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        try:
            dev = torch.device(name)
        except RuntimeError:  # e.g. cuda:x
            raise UserError(f"`--train-device` must be cpu, cuda or cuda:N, got {name!r}") \
                from None
        if not torch.cuda.is_available():
            raise UserError(f"`--train-device {name}`: PyTorch sees no CUDA device here "
                            f"(torch {torch.__version__}); use `--train-device cpu`")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"`--train-device {name}`: only {torch.cuda.device_count()} CUDA "
                            f"device(s) here; use `cuda:0`")
        return dev
    raise UserError(f"`--train-device` must be cpu, cuda or cuda:N, got {name!r}")


def train_resumable(model: nn.Module, data: Dataset, config: TrainConfig, *,
                    state_path, run_key: dict[str, Any], teacher: nn.Module | None = None,
                    progress: bool = False,
                    announce: Callable[[str], None] = log.info) -> dict[str, Any]:
    """``train`` with a state file written after every epoch (atomically), so a killed run
    continues from its last finished epoch. The state belongs to ``run_key`` (what is being
    trained and how): a state of another run is ignored, never resumed. The caller removes the
    state file once the trained model is saved (not before: a kill in between loses nothing)."""
    from pathlib import Path

    from ._io import atomic_write

    state_path = Path(state_path)
    resume = None
    if state_path.is_file():
        try:
            saved = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception:  # a torn or foreign file: start over rather than crash
            saved = {}
        if isinstance(saved, dict) and saved.get("run_key") == run_key:
            resume = saved["state"]
            announce(f"resuming training from epoch {resume['epoch']} ({state_path})")
        else:
            announce(f"ignoring {state_path}: it belongs to a different training run")

    def on_epoch_end(epoch: int, state: dict[str, Any]) -> None:
        atomic_write(state_path, lambda tmp: torch.save({"run_key": run_key, "state": state},
                                                        tmp))

    history = train(model, data, config, teacher=teacher, progress=progress,
                    resume_state=resume, on_epoch_end=on_epoch_end)
    return history
