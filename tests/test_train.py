import torch

from autoprune.models import ModelSpec, build_model
from autoprune.train import TrainConfig, distillation_loss, evaluate, train


def _model(digits):
    return build_model(ModelSpec("resnet20", num_classes=10, in_channels=1, input_size=8))


def test_training_learns_digits(digits):
    model = _model(digits)
    before = evaluate(model, digits.val)
    history = train(model, digits, TrainConfig(epochs=3, batch_size=64, lr=0.05))
    after = evaluate(model, digits.val)
    assert len(history["val_acc"]) == 3 and history["val_acc"][-1] == after
    assert history["loss"][-1] < history["loss"][0]
    assert after > 0.8 > before + 0.3


def test_resume_matches_uninterrupted(digits):
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05, seed=5)
    torch.manual_seed(0)
    a = _model(digits)
    init = {k: v.clone() for k, v in a.state_dict().items()}
    train(a, digits, cfg)

    states = {}
    b = _model(digits)
    b.load_state_dict(init)
    train(b, digits, cfg, on_epoch_end=lambda epoch, state: states.__setitem__(epoch, state))
    assert sorted(states) == [1, 2]
    for k, v in b.state_dict().items():  # b's final weights equal an uninterrupted run's
        assert torch.equal(v, a.state_dict()[k]), k
    # Continue from the epoch-1 state: the same batches and learning rates follow.
    c = _model(digits)
    history = train(c, digits, cfg, resume_state=states[1])
    assert len(history["val_acc"]) == 2
    for k, v in a.state_dict().items():
        assert torch.allclose(v.float(), c.state_dict()[k].float(), atol=1e-5), k


def test_distillation_uses_the_teacher(digits):
    teacher = _model(digits)
    train(teacher, digits, TrainConfig(epochs=3, batch_size=64, lr=0.05))
    student = _model(digits)
    x, y = digits.val.x[:32], digits.val.y[:32]
    with torch.no_grad():
        t, s = teacher.eval()(x), student.eval()(x)
    plain = distillation_loss(s, t, y, alpha=0.0, temperature=4.0)
    kd = distillation_loss(s, t, y, alpha=0.9, temperature=4.0)
    assert torch.isclose(plain, torch.nn.functional.cross_entropy(s, y))
    assert not torch.isclose(plain, kd)
    assert distillation_loss(t, t, y, alpha=1.0, temperature=4.0).abs() < 1e-5
    history = train(student, digits, TrainConfig(epochs=2, batch_size=64, lr=0.05),
                    teacher=teacher)
    assert history["val_acc"][-1] > 0.5


def test_training_on_the_best_device_here_resumes_on_the_cpu(digits):
    """`--train-device`: a distilled run where the model is (CUDA on a GPU machine, else the
    CPU) writes CPU states that resume on the CPU and end where the first run ended."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05, seed=3)
    teacher = _model(digits)
    train(teacher, digits, TrainConfig(epochs=3, batch_size=64, lr=0.05))
    torch.manual_seed(0)
    a = _model(digits).to(dev)
    init = {k: v.cpu().clone() for k, v in a.state_dict().items()}
    states = {}
    history = train(a, digits, cfg, teacher=teacher,
                    on_epoch_end=lambda epoch, state: states.__setitem__(epoch, state))
    assert all(p.device.type == dev.type for p in a.parameters())
    assert next(teacher.parameters()).device.type == dev.type  # the teacher went along
    assert history["val_acc"][-1] == evaluate(a, digits.val) > 0.5

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from tensors(v)

    assert all(t.device.type == "cpu" for t in tensors(states[1]))  # resumable anywhere
    assert any(not torch.equal(v, init[k]) for k, v in states[1]["model"].items())
    b = _model(digits)  # on the CPU, from the epoch-1 state
    teacher.cpu()
    train(b, digits, cfg, teacher=teacher, resume_state=states[1])
    for k, v in a.state_dict().items():  # the same batches and learning rates followed
        assert torch.allclose(v.cpu().float(), b.state_dict()[k].float(), atol=1e-3), k
