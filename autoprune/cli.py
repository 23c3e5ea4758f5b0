"""The `autoprune` command: the only place that parses arguments and prints.

Exit codes: 0 ok, 2 user error (one line, no traceback; `--debug` shows it), 1 bug.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import UserError

log = logging.getLogger("autoprune")

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "resnet20-fashion-mnist.pt"


# --------------------------------------------------------------------------- model resolution
@dataclass
class Loaded:
    model: object  # nn.Module, in eval mode
    spec: object  # ModelSpec
    data_spec: str
    input_shape: tuple
    weights: Path | None
    policy: object | None  # the Policy a pruned checkpoint was cut with

    def example_input(self):
        import torch

        return torch.zeros(self.input_shape)


def _resolve_model(args, *, need_weights: bool = False) -> Loaded:
    """--model / --weights / --data -> a loaded model and its data spec.

    An autoprune checkpoint carries its model spec, data spec and input shape (and, when pruned,
    its policy), so ``--weights`` alone is enough; with nothing given, the shipped Fashion-MNIST
    ResNet-20 is used.
    """
    import torch

    from .models import ModelSpec, build_model, load_state, read_checkpoint
    from .policy import Policy
    from .prune import apply_policy

    weights = Path(args.weights) if getattr(args, "weights", None) else None
    if weights is None and not args.model:
        if not DEFAULT_WEIGHTS.is_file():
            raise UserError(f"the shipped checkpoint {str(DEFAULT_WEIGHTS)!r} is missing; "
                            "restore it with `git checkout -- autoprune/weights` or pass "
                            "`--model`/`--weights`")
        weights = DEFAULT_WEIGHTS
    ckpt = read_checkpoint(weights) if weights is not None else None
    data_spec = args.data or (ckpt or {}).get("data") or "fashion-mnist"
    if ckpt is not None and ckpt.get("model") is not None:
        spec = ModelSpec.from_dict(ckpt["model"])
        if args.model and args.model != spec.name:
            raise UserError(f"`--model {args.model}` differs from the model {spec.name!r} "
                            f"stored in {str(weights)!r}; drop `--model` or pass its weights")
        input_shape = tuple(ckpt["input_shape"])
    else:
        if not args.model:
            raise UserError(f"{str(weights)!r} is a bare state dict; name its architecture "
                            "with `--model`")
        if need_weights and weights is None:
            raise UserError(f"`--weights` is needed with `--model {args.model}`: this command "
                            "works on a trained model")
        from .data import load_dataset

        data = load_dataset(data_spec)
        spec = ModelSpec(args.model, num_classes=data.num_classes,
                         in_channels=data.in_channels, input_size=data.input_size)
        input_shape = data.input_shape
    model = build_model(spec)
    _check_input(model, input_shape, spec)
    policy = None
    if ckpt is not None and (ckpt.get("extra") or {}).get("policy"):
        # A pruned checkpoint: cut the same shape (weights are overwritten just below).
        policy = Policy.from_dict(ckpt["extra"]["policy"])
        model = apply_policy(model, policy, example_input=torch.zeros(input_shape),
                             importance="l1")
    if ckpt is not None:
        load_state(model, ckpt["state_dict"], source=str(weights))
    model.eval()
    return Loaded(model, spec, data_spec, input_shape, weights, policy)


def _check_input(model, input_shape, spec) -> None:
    import torch

    try:
        with torch.no_grad():
            model.eval()(torch.zeros(input_shape))
    except Exception as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"model {spec.name!r} cannot run on input shape {list(input_shape)} "
                        f"({type(e).__name__}: {detail}); check that `--data` matches the "
                        "model's input") from e


def _load_data(loaded: Loaded):
    from .data import load_dataset

    data = load_dataset(loaded.data_spec)
    if tuple(data.input_shape[1:]) != tuple(loaded.input_shape[1:]):
        raise UserError(f"`--data {loaded.data_spec}` gives inputs {list(data.input_shape[1:])}"
                        f" but the model expects {list(loaded.input_shape[1:])}; pass the "
                        "dataset it was trained on")
    return data


def _build_space(loaded: Loaded, args, *, coupled_round_to: int | None = None):
    from .space import SearchSpace, SpaceSpec

    spec = SpaceSpec.load(args.space) if getattr(args, "space", None) else \
        SpaceSpec.for_family(loaded.spec.family)
    round_to = getattr(args, "round_to", None)
    if round_to is not None and round_to < 1:
        raise UserError(f"`--round-to` must be >= 1, got {round_to}")
    return SearchSpace.from_model(loaded.model, loaded.example_input(), spec,
                                  family=loaded.spec.family, round_to=round_to,
                                  coupled_round_to=coupled_round_to)


# --------------------------------------------------------------------------- commands
def cmd_train(args) -> int:

    from .data import load_dataset
    from .models import ModelSpec, build_model, save_checkpoint
    from .train import TrainConfig, evaluate, train_device, train_resumable

    config = TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                         batch_size=args.batch_size, seed=args.seed)
    device = train_device(args.train_device)
    out = Path(args.out)
    _check_writable(out)
    data = load_dataset(args.data, seed=args.seed)
    spec = ModelSpec(args.model, num_classes=data.num_classes, in_channels=data.in_channels,
                     input_size=data.input_size)
    model = build_model(spec)
    _check_input(model, data.input_shape, spec)
    model.to(device).train()
    # the device is not part of the run's key: a state file written on one resumes on another
    run_key = {"model": spec.to_dict(), "data": args.data, "config": config.__dict__}
    state_path = out.with_name(out.name + ".train-state")
    history = train_resumable(model, data, config, state_path=state_path, run_key=run_key,
                              progress=not args.quiet, announce=print)
    val_acc, test_acc = evaluate(model, data.val), evaluate(model, data.test)
    model.cpu()  # checkpoints hold CPU tensors, whatever trained them
    save_checkpoint(out, model, model_spec=spec, data_spec=args.data,
                    input_shape=data.input_shape,
                    metrics={"val_acc": val_acc, "test_acc": test_acc},
                    extra={"train_config": dict(config.__dict__), "history": history,
                           "train_device": str(device),
                           "data_mean": list(data.mean), "data_std": list(data.std)})
    state_path.unlink(missing_ok=True)
    print(f"val accuracy  {val_acc * 100:.2f}%  ({len(data.val)} images)")
    print(f"test accuracy {test_acc * 100:.2f}%  ({len(data.test)} images)")
    print(f"checkpoint    {out}")
    return 0


def _console():
    from rich.console import Console

    return Console(soft_wrap=False, width=max(130, Console().width))


def _fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def cmd_space(args) -> int:
    loaded = _resolve_model(args)
    device = _device(args) if args.target_device else None
    # for a device: the space its search uses (its channel multiple, residual streams on it)
    space = _device_space(loaded, args, device) if device else _build_space(loaded, args)
    if args.json:
        out = space.to_dict()
        out["model"] = loaded.spec.to_dict()
        if device:
            out["device"] = device.name
        print(json.dumps(out, indent=2))
        return 0
    from rich.table import Table

    table = Table(title=f"search space of {loaded.spec.name} ({len(space)} groups, "
                        f"bounds from {Path(space.spec_source).name}"
                        + (f", as searched for {device.name}" if device else "") + ")")
    for col, just in (("#", "right"), ("group", "left"), ("kind", "left"),
                      ("channels", "right"), ("keep range", "right"), ("grid", "right"),
                      ("MACs share", "right")):
        table.add_column(col, justify=just, no_wrap=True)
    table.add_column("coupled layers", no_wrap=True, overflow="ellipsis", max_width=44)
    for i, g in enumerate(space.groups):
        convs = [m for m in dict.fromkeys(g.convs) if m != g.name]
        coupled = (f"{len(convs)}: " if len(convs) > 2 else "") + ", ".join(convs[:2]) + \
            (", ..." if len(convs) > 2 else "")
        table.add_row(str(i), g.name, g.kind, str(g.channels),
                      f"{g.min_channels}-{g.max_channels}", f"x{g.round_to} "
                      f"({len(g.choices)})", f"{g.macs_share * 100:.1f}%", coupled or "-")
    console = _console()
    console.print(table)
    console.print(f"model {loaded.spec.name}: input {list(space.input_shape)}, "
                  f"MACs {_fmt_count(space.total_macs)}, params {_fmt_count(space.total_params)}")
    return 0


def cmd_evaluate(args) -> int:
    from .train import evaluate

    loaded = _resolve_model(args, need_weights=True)
    data = _load_data(loaded)
    split = getattr(data, args.split)
    acc = evaluate(loaded.model, split, batch_size=args.batch_size)
    if args.json:
        print(json.dumps({"model": loaded.spec.name, "data": loaded.data_spec,
                          "split": args.split, "images": len(split), "accuracy": acc}))
    else:
        print(f"{loaded.spec.name} on {loaded.data_spec} {args.split} split: "
              f"{acc * 100:.2f}% top-1 ({len(split)} images)")
    return 0


def cmd_prune(args) -> int:
    from .count import count_macs, count_params
    from .export import check_onnx, export_onnx
    from .models import save_checkpoint
    from .policy import Policy
    from .prune import apply_policy
    from .train import evaluate

    loaded = _resolve_model(args, need_weights=True)
    if loaded.policy is not None:
        raise UserError(f"{str(loaded.weights)!r} is already pruned; prune the unpruned "
                        "checkpoint it came from")
    space = _build_space(loaded, args)
    policy = space.validate(Policy.load(args.policy), source=f"policy file {args.policy!r}")
    out = Path(args.out)
    _check_writable(out)
    if args.onnx:
        _check_writable(Path(args.onnx))
    data = _load_data(loaded)
    x = loaded.example_input()
    batch = (data.train.x[:64], data.train.y[:64]) if args.importance == "taylor" else None
    pruned = apply_policy(loaded.model, policy, importance=args.importance, example_input=x,
                          batch=batch)
    before = {"macs": count_macs(loaded.model, x), "params": count_params(loaded.model),
              "val_acc": evaluate(loaded.model, data.val)}
    after = {"macs": count_macs(pruned, x), "params": count_params(pruned),
             "val_acc": evaluate(pruned, data.val)}
    save_checkpoint(out, pruned, model_spec=loaded.spec, data_spec=loaded.data_spec,
                    input_shape=loaded.input_shape, metrics={"val_acc": after["val_acc"]},
                    extra={"policy": policy.to_dict(), "importance": args.importance})
    result = {"policy": policy.to_dict(), "before": before, "after": after,
              "checkpoint": str(out)}
    if args.onnx:
        export_onnx(pruned, x, args.onnx)
        result["onnx"] = {"path": args.onnx,
                          "max_abs_diff": check_onnx(args.onnx, pruned, data.val.x[:64])}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"MACs   {_fmt_count(before['macs'])} -> {_fmt_count(after['macs'])} "
          f"({after['macs'] / before['macs'] * 100:.1f}%)")
    print(f"params {_fmt_count(before['params'])} -> {_fmt_count(after['params'])} "
          f"({after['params'] / before['params'] * 100:.1f}%)")
    print(f"val accuracy {before['val_acc'] * 100:.2f}% -> {after['val_acc'] * 100:.2f}% "
          "(no fine-tuning, no BN recalibration)")
    print(f"checkpoint {out}")
    if args.onnx:
        print(f"onnx {args.onnx} (max abs diff vs PyTorch "
              f"{result['onnx']['max_abs_diff']:.2e})")
    return 0


def _device(args):
    from .latency.devices import get_device

    return get_device(args.target_device, args.devices)


def _device_space(loaded: Loaded, args, device):
    """The search space on the device's channel multiple (unless --round-to overrides it;
    residual streams stay on the device's multiple even then: see `SearchSpace.from_model`)."""
    if getattr(args, "round_to", None) is None:
        args.round_to = device.channel_multiple
    return _build_space(loaded, args, coupled_round_to=device.channel_multiple)


def _backend(device, args):
    from .latency.backends import get_backend

    options = {}
    if device.runtime == "tvm":
        if getattr(args, "trials_per_task", None):
            options["trials_per_task"] = args.trials_per_task
        options["tuning_dir"] = _tables_root(args) / device.name / "tuning"
    return get_backend(device, **options)


def _tables_root(args) -> Path:
    from .latency.devices import LATENCY_TABLES_DIR

    return Path(args.tables) if getattr(args, "tables", None) else LATENCY_TABLES_DIR


def cmd_devices(args) -> int:
    from .latency.devices import availability, cpu_model, load_devices, runtime_versions

    devices = load_devices(args.devices)
    rows = []
    for d in devices.values():
        usable, why = availability(d)
        where = d.provider if d.runtime == "onnxruntime" else json.dumps(d.target)
        rows.append({"name": d.name, "runtime": d.runtime, "threads": d.threads,
                     "batch": d.batch, "channel_multiple": d.channel_multiple,
                     "provider_or_target": where, "tuned": d.tuned, "usable": usable,
                     "why_not": why, "description": d.description})
    versions = runtime_versions()
    if args.json:
        print(json.dumps({"cpu": cpu_model(), "versions": versions, "devices": rows}, indent=2))
        return 0
    from rich.table import Table

    table = Table(title="target devices")
    for col in ("name", "runtime", "threads", "batch", "multiple"):
        table.add_column(col, no_wrap=True)
    table.add_column("provider / target", max_width=36, overflow="fold")
    table.add_column("usable here", min_width=24)
    for r in rows:
        table.add_row(r["name"], r["runtime"] + (" (tuned)" if r["tuned"] else ""),
                      str(r["threads"]), str(r["batch"]), str(r["channel_multiple"]),
                      r["provider_or_target"], "yes" if r["usable"] else f"no: {r['why_not']}")
    console = _console()
    console.print(table)
    console.print(f"CPU {cpu_model()}; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return 0


def cmd_measure(args) -> int:
    from .policy import Policy
    from .prune import apply_policy

    device = _device(args)
    loaded = _resolve_model(args)
    model = loaded.model
    if args.policy:
        if loaded.policy is not None:
            raise UserError(f"{str(loaded.weights)!r} is already pruned; drop `--policy` or "
                            "pass the unpruned checkpoint")
        space = _device_space(loaded, args, device)
        policy = space.validate(Policy.load(args.policy), source=f"policy file "
                                f"{args.policy!r}")
        model = apply_policy(model, policy, example_input=loaded.example_input())
    with _backend(device, args) as backend:
        stat = backend.measure_model(model, loaded.input_shape)
        per_op = backend.per_op(model, loaded.input_shape) if args.per_op else None
    out = {"device": device.name, "model": loaded.spec.name, "policy": args.policy,
           "input_shape": [device.batch, *loaded.input_shape[1:]], **stat.to_dict()}
    if per_op is not None:
        out["per_op_ms"] = per_op
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{loaded.spec.name}{' + ' + args.policy if args.policy else ''} on {device.name}: "
          f"median {stat.median_ms:.4f} ms, IQR {stat.iqr_ms:.4f} ms, n={stat.n}")
    if per_op:
        top = sorted(per_op.items(), key=lambda kv: -kv[1])[:15]
        print(f"slowest of {len(per_op)} kernels (sum {sum(per_op.values()):.4f} ms):")
        for name, ms in top:
            print(f"  {ms:8.4f} ms  {name}")
    return 0


def cmd_profile(args) -> int:
    from .latency.profile import build_table, model_key, scatter_png, validate
    from .latency.table import table_path

    if args.validate is not None and args.validate < 3:
        raise UserError(f"`--validate` needs at least 3 policies, got {args.validate}")
    if args.calibrate is not None and args.calibrate < 2:
        raise UserError(f"`--calibrate` needs at least 2 random policies, got {args.calibrate}")
    if args.validate_rounds < 1:
        raise UserError(f"`--validate-rounds` needs at least 1 pass, got {args.validate_rounds}")
    device = _device(args)
    loaded = _resolve_model(args)
    if loaded.policy is not None:
        raise UserError(f"{str(loaded.weights)!r} is pruned; profile the unpruned model")
    space = _device_space(loaded, args, device)
    key = model_key(loaded.spec.name, loaded.input_shape)
    path = Path(args.table) if args.table else \
        table_path(device.name, loaded.spec.name, _tables_root(args))
    with _backend(device, args) as backend:
        setup = build_table(loaded.model, space, device, backend, key=key,
                            model_name=loaded.spec.name, path=path, rebuild=args.rebuild,
                            calibrate_n=args.calibrate, recalibrate=args.recalibrate,
                            progress=not args.quiet)
        cal = setup.table.calibration[key]
        summary = {"table": str(setup.table.path), "entries": len(setup.table.entries),
                   "device": device.name, "model": key, "calibration": cal.to_dict()}
        if setup.extension:
            summary["extension"] = setup.extension
        pred = setup.predictor()
        summary["predicted_ms"] = {"full": pred.max_latency(), "smallest": pred.min_latency()}
        if args.validate:
            result = validate(setup, loaded.model, backend, n=args.validate, seed=args.seed,
                              rounds=args.validate_rounds, progress=not args.quiet)
            out_dir = Path(args.out or Path("runs") / "validation")
            stem = f"{device.name}-{loaded.spec.name}".replace("/", "_").replace(":", "_")
            from ._io import write_json

            json_path = write_json(out_dir / f"{stem}.json", result)
            png = scatter_png(result, out_dir / f"{stem}.png")
            summary["validation"] = {k: v for k, v in result.items() if k != "rows"}
            summary["validation"]["json"], summary["validation"]["png"] = str(json_path), \
                str(png)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"latency table {summary['table']}: {summary['entries']} op entries")
    if "extension" in summary:
        ext = summary["extension"]
        print(f"  {ext['added']} of them new: {ext['anchors']} earlier entries measured again "
              f"put them on the table's timebase (x{ext['scale']:.3f})")
    kinds = "".join(f", {k} ops x {v:.4f}" for k, v in sorted(cal.kind_scales.items()))
    print(f"calibration: measured = {cal.scale:.4f} x sum(ops) {cal.offset_ms:+.4f} ms{kinds} "
          f"(fit on {cal.n} whole-model runs, mean abs error {cal.fit_mean_abs_pct:.2f}%)")
    print(f"predicted latency: full {summary['predicted_ms']['full']:.4f} ms, smallest policy "
          f"{summary['predicted_ms']['smallest']:.4f} ms")
    if args.validate:
        from rich.table import Table

        v = summary["validation"]
        table = Table(title=f"validation: {v['n']} random policies measured whole on "
                            f"{device.name}, the quickest of {v['rounds']} passes (median IQR "
                            f"{v['median_iqr_pct']:.1f}%)")
        for col in ("estimator", "mean abs % error", "% within ±10%", "Kendall tau"):
            table.add_column(col, justify="right" if col != "estimator" else "left")
        for name, key_ in (("latency predictor", "predictor"), ("MACs proxy", "macs_proxy")):
            sc = v[key_]
            table.add_row(name, f"{sc['mean_abs_pct_error']:.2f}", f"{sc['within_10pct']:.1f}",
                          f"{sc['kendall_tau']:.3f}")
        _console().print(table)
        if v.get("measured_split_half_tau") is not None:
            print(f"the measurement against itself (even passes vs odd): Kendall tau "
                  f"{v['measured_split_half_tau']:.3f}; a predictor's tau near or above it is "
                  "limited by measurement noise: add passes with `--validate-rounds`")
        print(f"wrote {v['json']} and {v['png']}")
    return 0


def cmd_predict(args) -> int:
    from .latency.profile import load_setup, model_key
    from .latency.table import table_path
    from .policy import Policy

    device = _device(args)
    loaded = _resolve_model(args)
    if loaded.policy is not None:
        raise UserError(f"{str(loaded.weights)!r} is pruned; predict with the unpruned model "
                        "and `--policy`")
    space = _device_space(loaded, args, device)
    policy = space.validate(Policy.load(args.policy), source=f"policy file {args.policy!r}") \
        if args.policy else space.full()
    path = Path(args.table) if args.table else \
        table_path(device.name, loaded.spec.name, _tables_root(args))
    setup = load_setup(loaded.model, space, device, key=model_key(loaded.spec.name,
                       loaded.input_shape), model_name=loaded.spec.name, path=path)
    pred = setup.predictor()
    out = {"device": device.name, "model": setup.key, "table": str(path),
           "predicted_ms": pred.predict(policy), "full_ms": pred.max_latency(),
           "smallest_ms": pred.min_latency(), "group_ms": pred.group_costs(policy)}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"predicted {out['predicted_ms']:.4f} ms on {device.name} (unpruned "
          f"{out['full_ms']:.4f} ms, smallest policy {out['smallest_ms']:.4f} ms; "
          f"{out['predicted_ms'] / out['full_ms'] * 100:.1f}% of unpruned)")
    return 0


def _latency_setup(loaded: Loaded, args, device, *, quiet: bool):
    """The model's latency table on the device: loaded when complete, else profiled now."""
    from .latency.profile import build_table, model_key
    from .latency.table import table_path

    space = _device_space(loaded, args, device)
    key = model_key(loaded.spec.name, loaded.input_shape)
    path = table_path(device.name, loaded.spec.name, _tables_root(args))
    with _backend(device, args) as backend:
        return build_table(loaded.model, space, device, backend, key=key,
                           model_name=loaded.spec.name, path=path, progress=not quiet)


def _summary_table(title: str, rows: list[tuple[str, object]], full_ms: float, study):
    """Best vs uniform vs unpruned: predicted latency, and measured where the study measured it
    on the device (the quickest of 3 passes; "-" where it did not)."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("", "val acc", "latency (pred.)", "of unpruned", "measured", "MACs", "params",
                "feasible"):
        table.add_column(col, justify="left" if not col else "right")
    for name, c in rows:
        m = study.measurement(c.policy)
        table.add_row(name, f"{c.val_acc * 100:.2f}%", f"{c.latency_ms:.4f} ms",
                      f"{c.latency_ms / full_ms * 100:.1f}%",
                      f"{m['median_ms']:.4f} ms" if m else "-", _fmt_count(c.macs),
                      _fmt_count(c.params), "yes" if c.feasible else "no")
    return table


def _reference(study, evaluator, space, predictor) -> dict:
    """The unpruned model and the best uniform policy under the same budget, scored by the
    same evaluator (kept in reference.json, so a resumed study does not score them again)."""
    from ._io import write_json
    from .evaluate import Candidate
    from .search import best_uniform

    path = study.root / "reference.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        return {k: Candidate.from_json(json.dumps(v)) for k, v in saved.items()}
    ref = {"uniform": evaluator.evaluate(best_uniform(space, predictor, evaluator.budget_ms),
                                         searcher="uniform", trial=0),
           "unpruned": evaluator.evaluate(space.full(), searcher="unpruned", trial=0)}
    write_json(path, {k: json.loads(v.to_json()) for k, v in ref.items()})
    return ref


def _saved_config(root: Path) -> dict | None:
    """A study's config.json, or None where there is none (or it is unreadable: `Study.open`
    refuses it with the message)."""
    path = root / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _check_budget(args, device, model, space, predictor, budget_ms: float,
                  root: Path) -> tuple[float, dict | None]:
    """The budget the search uses, in the predictor's ms, and the check behind it (None: the
    table's own): ``--budget-check K`` policies the table puts at the budget are measured on
    the device, and the budget is scaled by how far off the table is there
    (`evaluate.check_budget`). Made once, when the study is created: a resume uses the saved
    check, so it searches the same budget and resumes the same study."""
    from .evaluate import BUDGET_CHECK_PASSES, budget_measurer, check_budget, near_budget_policies
    from .latency.devices import availability
    from .progress import bar

    def saved_check():
        saved = _saved_config(root)
        if saved is None:
            return None
        made = saved.get("budget_check")
        return (budget_ms * made["scale"] if made else budget_ms), made

    if (resumed := saved_check()) is not None:
        return resumed
    if args.budget_check == 0:
        return budget_ms, None
    usable, why = availability(device)
    if not usable:
        _say(args, f"budget not checked on {device.name} ({why}): the table's is searched")
        return budget_ms, None
    policies = near_budget_policies(space, predictor, budget_ms, args.budget_check,
                                    seed=args.seed)
    least = len(policies) * BUDGET_CHECK_PASSES  # measurements; more where it is busy
    with _backend(device, args) as backend, \
            bar(f"check the budget on {device.name}", least, enabled=not args.quiet,
                fields="quiet {task.fields[quiet]}") as pbar:
        measured = [0]

        def advance(*_):
            measured[0] += 1
            if measured[0] <= least:  # the passes a busy machine adds run with the bar full
                pbar.advance()

        measure = budget_measurer(backend, model, space, fraction=args.latency_budget,
                                  budget_ms=args.latency_budget_ms, on_measured=advance)
        check = check_budget(
            policies, predictor, budget_ms, measure, floor_ms=predictor.min_latency(),
            on_pass=lambda _, quiet: pbar.update(quiet=f"{quiet}/{len(policies)}"))
    if (resumed := saved_check()) is not None:  # a worker beside this one made the study
        return resumed
    import statistics

    med = statistics.median(check.measured_over_predicted)
    line = (f"budget checked on {device.name}: {len(policies)} policies the table puts at "
            f"the budget measure {med:.3f} x it (median; {check.passes} passes); searching to "
            f"{budget_ms * check.scale:.4f} ms predicted (the table's {budget_ms:.4f})")
    if check.unquiet:
        line += (f"; {check.unquiet} of them were never measured while the unpruned model "
                 "beside them ran at its quickest (the machine was busy), their quickest "
                 "counted")
    if check.clamped:
        log.warning("%s, held there: the table is far off this machine near the budget; "
                    "rebuild it with `%s`", line, _profile_command(args, "--rebuild"))
    else:
        _say(args, line)
    return budget_ms * check.scale, check.to_dict()


@contextlib.contextmanager
def _creating_study(runs: Path, name: str, *, shared: bool):
    """An exclusive lock on making study ``name`` under ``runs``, held by one worker of a
    shared study at a time (a no-op for a study of one process: its own lock refuses a
    second)."""
    if not shared:
        yield
        return
    import fcntl

    try:
        runs.mkdir(parents=True, exist_ok=True)
        lock = open(runs / f".{name}.create.lock", "a")  # noqa: SIM115 (held across the yield)
    except OSError as e:
        raise UserError(f"cannot write to the runs folder {str(runs)!r} ({e.strerror}); choose "
                        "another `--runs`") from e
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _budget_words(config: dict) -> str:
    """The budget a study searched, for a summary's title: in predicted ms, and where the
    check on the device moved it, the table's own beside it."""
    made = config.get("budget_check")
    words = f"{config['budget_ms']:.4f} ms"
    if made:
        words += f" predicted (checked on the device; the table's {made['table_budget_ms']:.4f})"
    return words


def _say(args, line: str) -> None:
    if not args.quiet:
        _console().print(line)


def cmd_search(args) -> int:
    import datetime as _dt

    from . import __version__
    from .evaluate import Evaluator, resolve_budget
    from .models import file_sha256
    from .progress import bar
    from .search import SEARCHERS, SearchContext
    from .study import Study
    from .study import identity as study_identity

    if args.trials is not None and args.trials < 1:
        raise UserError(f"`--trials` must be >= 1, got {args.trials}")
    if args.verify_top < 0:
        raise UserError(f"`--verify-top` must be >= 0 (0 skips the measured check), got "
                        f"{args.verify_top}")
    if not 0 <= args.verify_tolerance < 1:
        raise UserError(f"`--verify-tolerance` must be in [0, 1), got {args.verify_tolerance}")
    if not (math.isfinite(args.verify_seconds) and args.verify_seconds >= 0):
        raise UserError("`--verify-seconds` must be a finite number >= 0 (0: one measurement "
                        f"a candidate), got {args.verify_seconds}")
    if args.budget_check < 0:
        raise UserError(f"`--budget-check` must be >= 0 (0 trusts the latency table), got "
                        f"{args.budget_check}")
    if args.amc_actor_reg is not None:  # before any model or table is loaded
        from .search.amc import check_actor_reg

        check_actor_reg(args.amc_actor_reg)
    if args.amc_update_ratio is not None:
        from .search.amc import check_update_ratio

        check_update_ratio(args.amc_update_ratio)
    if args.storage and args.storage.split(":", 1)[0].split("+")[0] not in (
            "sqlite", "postgresql", "mysql"):
        from .search.evolution import redacted

        raise UserError(f"`--storage` must be an RDB URL (sqlite:///..., postgresql://...), "
                        f"got {redacted(args.storage)!r}")
    if args.storage and args.searcher != "evolution":
        # amc's agent checkpoints, random's draws and uniform's bisection live in one
        # process: workers would overwrite one another's checkpoints and repeat the same draws
        raise UserError(f"`--storage` shares an evolution study's Optuna trials between "
                        f"workers; `--searcher {args.searcher}` runs in one process: drop "
                        "`--storage`, or search with `--searcher evolution`")
    if args.storage:  # reachable before anything is made: a study folder left half-made else
        from .search.evolution import check_storage

        check_storage(args.storage)
    device = _device(args)
    loaded = _resolve_model(args, need_weights=True)
    if loaded.policy is not None:
        raise UserError(f"{str(loaded.weights)!r} is already pruned; search on the unpruned "
                        "checkpoint")
    setup = _latency_setup(loaded, args, device, quiet=args.quiet)
    space, predictor = setup.space, setup.predictor()
    budget_ms = resolve_budget(predictor, fraction=args.latency_budget, ms=args.latency_budget_ms)
    name = args.study or (f"{loaded.spec.name.split('/')[-1].replace(':', '-')}-{device.name}-"
                          f"{args.searcher}-" + (f"b{args.latency_budget:g}"
                                                 if args.latency_budget is not None
                                                 else f"{args.latency_budget_ms:g}ms"))
    # workers sharing a study (`--storage`) make it one at a time: the first checks the
    # budget and writes the config, the others wait for it and then take its check, so
    # that all of them search one budget (each measuring its own, they differed)
    with _creating_study(Path(args.runs), name, shared=args.storage is not None):
        budget_ms, budget_check = _check_budget(args, device, loaded.model, space, predictor,
                                                budget_ms, Path(args.runs) / name)
        data = _load_data(loaded)
        evaluator = Evaluator(loaded.model, data, space, predictor, budget_ms=budget_ms,
                              val_images=args.val_images, adaptive_bn=not args.no_adaptive_bn,
                              importance=args.importance, seed=args.seed)
        options = {}
        if args.searcher == "evolution":
            options = {"population": args.population, "sampler": args.sampler}
        elif args.searcher == "amc":
            options = {"reward": args.reward, "warmup_episodes": args.warmup_episodes,
                       "action": args.amc_action, "repeats": args.amc_repeats,
                       "warmup_policies": args.amc_warmup_policies}
            if args.amc_actor_reg is not None:
                options["actor_reg"] = args.amc_actor_reg
            if args.amc_update_ratio is not None:
                options["update_ratio"] = args.amc_update_ratio
        searcher = SEARCHERS[args.searcher]()(space, predictor, budget_ms, seed=args.seed,
                                             **options)
        # uniform: its best and the fallbacks the measured check may need (not --trials)
        n_trials = 1 + searcher.fallbacks if args.searcher == "uniform" else (args.trials or 100)
        budget = {"fraction": args.latency_budget} if args.latency_budget is not None else \
            {"ms": args.latency_budget_ms}
        versions = {"autoprune": __version__}
        for mod in ("torch", "torch_pruning", "optuna", "stable_baselines3", "onnxruntime"):
            try:
                versions[mod] = __import__(mod).__version__
            except ImportError:
                versions[mod] = "unavailable"
        config = {
            "model": loaded.spec.to_dict(), "data": loaded.data_spec,
            "weights_sha256": file_sha256(loaded.weights) if loaded.weights else None,
            "weights": str(loaded.weights.resolve()) if loaded.weights else None,
            "device": device.to_dict(), "budget": budget, "budget_ms": round(budget_ms, 9),
            "budget_check": budget_check,
            "searcher": args.searcher, "searcher_options": searcher.options(), "seed": args.seed,
            "space": _space_config(space, args, device),
            "evaluator": evaluator.describe(), "reward": args.reward,
            "versions": versions,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        if args.storage:  # before this worker's study folder is made
            from .search.evolution import check_shared_config

            check_shared_config(args.storage, name, study_identity(config),
                                folder=Path(args.runs) / name)
        study = Study.open(Path(args.runs) / name, config, storage_url=args.storage)
    for cand in study.candidates:
        evaluator.add_known(cand)
    resumed = len(study.candidates)
    done = study.trials_done(args.searcher)
    best = [study.best()]

    try:
        with bar(f"search {args.searcher}", n_trials, enabled=not args.quiet,
                 completed=min(len(done), n_trials), fields="best {task.fields[best]}") as pbar:
            def show():
                b = best[0]
                pbar.update(best=f"{b.val_acc * 100:.2f}% @ {b.latency_ms:.4f} ms"
                            if b else "-")

            show()

            def catch_up():  # workers sharing the study: what the others have evaluated
                for cand in study.refresh():
                    evaluator.add_known(cand)

            def known(policy):
                catch_up()
                return policy in evaluator.cache

            def evaluate(policy, trial):
                catch_up()
                cached = evaluator.cache.get(policy)
                if cached is not None:
                    return cached
                cand = evaluator.evaluate(policy, searcher=args.searcher, trial=trial)
                study.append(cand)
                return cand

            def on_candidate(cand):
                if cand.feasible and (best[0] is None or (cand.val_acc, -cand.latency_ms) >
                                      (best[0].val_acc, -best[0].latency_ms)):
                    best[0] = cand
                pbar.advance()
                show()

            ctx = SearchContext(evaluate=evaluate, n_trials=n_trials, seed=args.seed,
                                state_dir=study.root / "amc", storage_url=study.storage_url,
                                study_name=name, done_trials=done,
                                shared_storage=study.shared,
                                on_candidate=on_candidate,
                                known=known, identity=study_identity(study.config))
            searcher.run(ctx)
            catch_up()  # the measured check and the results judge every worker's candidates
        reference = _reference(study, evaluator, space, predictor)
        verdict = _verify(study, args, device, loaded.model, space, reference)
        paths = study.write_results(reference)
    finally:
        study.release()
    best_c = study.best()
    full_ms = predictor.max_latency()
    console = _console()
    console.print(_summary_table(
        f"study {name}: {len(study.candidates)} candidates ({resumed} from before), budget "
        f"{_budget_words(study.config)} on {device.name}",
        [(f"best ({best_c.searcher})", best_c), ("uniform", reference["uniform"]),
         ("unpruned", reference["unpruned"])], full_ms, study))
    console.print(verdict)
    console.print(f"evaluated {evaluator.evaluations} new candidate(s); "
                  + ", ".join(f"{k} {v}" for k, v in paths.items()))
    return 0


def _space_config(space, args, device) -> dict:
    """The search space as a study's config records it: the channel grid asked for and, where
    it is finer than the device's multiple, the residual streams' grid (they keep the device's,
    see `SearchSpace.from_model`), so a study made before that rule is not resumed on it."""
    out = {"round_to": args.round_to, "source": Path(space.spec_source).name,
           "groups": list(space.names)}
    if device.channel_multiple > args.round_to:
        out["residual_round_to"] = device.channel_multiple
    return out


def _verify(study, args, device, model, space, reference) -> str:
    """The measured check that ends a search: the best candidates are measured whole on the
    device, most accurate first, until one is within the budget (plus ``--verify-tolerance``);
    that one is the study's best. Returns the line that tells the user what it found."""
    from .evaluate import budget_measurer, ranked, watched_measurer
    from .latency.devices import availability
    from .progress import bar

    if args.verify_top == 0:
        study.trust_prediction()
        return "best not measured on the device (`--verify-top 0`): its latency is predicted"
    usable, why = availability(device)
    if not usable:
        return f"best not measured on {device.name} ({why}): its latency is predicted"
    predicted_best = study.best()
    budget = study.config["budget"]
    with _backend(device, args) as backend, \
            bar(f"measure on {device.name}", 4 * args.verify_top + 2,  # the most it can take
                enabled=not args.quiet) as pbar:
        measure = watched_measurer(
            budget_measurer(backend, model, space, fraction=budget.get("fraction"),
                            budget_ms=budget.get("ms")),
            seconds=args.verify_seconds, on_measured=lambda *_: pbar.advance())
        found = study.verify(measure, tolerance=args.verify_tolerance, top=args.verify_top)
        for cand in reference.values():  # for the summary table
            study.measurement(cand.policy, measure)
        pbar.finish()  # its total was the most the check could take
    _warn_if_table_drifted(study, reference["unpruned"], device, args)
    what = (f"{budget['fraction']:g} of the unpruned model, measured beside each policy, at "
            "its quietest"
            if "fraction" in budget else f"{budget['ms']:g} ms")
    limit = f"budget ({what}) x {1 + args.verify_tolerance:g}"
    order = [c.policy for c in ranked(study.candidates)]
    ahead = order if found is None else order[:order.index(found.policy)]
    over = [r["over_budget"] for p in ahead  # those measured before `found`
            if (r := study.measurement(p)) is not None]
    if found is None:
        log.warning("none of the %d candidates measured (the most accurate, then those the "
                    "measurements say should fit) is within the %s on %s (the closest: %.3f x "
                    "budget); the best stays the predicted one. The latency table may not match "
                    "this machine any more: rebuild its calibration with `%s`", len(over),
                    limit, device.name, min(over), _profile_command(args, "--recalibrate"))
        return f"measured on {device.name}: no candidate within the {limit} (see the warning)"
    got = study.measurement(found.policy)
    skipped = len(ahead) - len(over)
    passed_over = "" if found.policy == predicted_best.policy else \
        (f"; {len(over)} more accurate candidate(s) measured over it (" +
         ", ".join(f"{r:.3f}" for r in over) + " x budget)" +
         (f" and {skipped} not measured, whose predictions rescaled by those measurements "
          "are over it too" if skipped else "") + ", so the best is the next one")
    watched = "" if got.get("measurements", 1) == 1 else \
        (f", the quickest {'quiet ' if got.get('quiet') else ''}one of "
         f"{got['measurements']} measurements")
    return (f"measured on {device.name}: best {got['median_ms']:.4f} ms = "
            f"{got['over_budget']:.3f} x budget (within the {limit}{watched}){passed_over}")


TABLE_DRIFT = 0.2  # unpruned predicted vs measured, beyond which the table is suspect


def _warn_if_table_drifted(study, unpruned, device, args) -> None:
    """Warn where the unpruned model, measured by the check at its quietest, is far from what
    the table predicts: the table then describes another machine (a table measured on one
    "AMD EPYC" predicted ResNet-56 at 1.73 ms on another that ran it in 1.09, and every
    pruned policy 10% too fast against it) or a load that has changed. The calibration is
    fitted to within a few percent, so 20% is no noise of measuring."""
    rec = study.measurement(unpruned.policy)
    if rec is None:
        return
    measured = min(rec["median_ms"], rec.get("budget_reference_ms", math.inf))
    off = measured / unpruned.latency_ms - 1.0
    if abs(off) > TABLE_DRIFT:
        log.warning("the latency table predicts the unpruned model at %.4f ms, and %s measures "
                    "it at %.4f ms (%+.0f%%): the table was measured on another machine or "
                    "under another load, and its predictions are off here; rebuild it with "
                    "`%s`", unpruned.latency_ms, device.name, measured, 100 * off,
                    _profile_command(args, "--rebuild"))


def _profile_command(args, flag: str) -> str:
    """The `autoprune profile` command for the table this command used: its own device, table,
    model and space options, then ``flag``."""
    import shlex

    words = ["autoprune", "profile", "--target-device", args.target_device]
    for opt in ("devices", "tables", "model", "weights", "data", "space", "round_to"):
        value = getattr(args, opt, None)
        if value is not None:
            words += ["--" + opt.replace("_", "-"), str(value)]
    return shlex.join([*words, flag])


def cmd_report(args) -> int:
    from .evaluate import Candidate
    from .study import Study

    study = Study.load(Path(args.runs) / args.study)
    ref_path = study.root / "reference.json"
    if not ref_path.is_file() or study.best() is None:
        raise UserError(f"study {args.study!r} has no finished search yet; run `autoprune "
                        f"search --study {args.study}`")
    reference = {k: Candidate.from_json(json.dumps(v))
                 for k, v in json.loads(ref_path.read_text()).items()}
    paths = study.write_results(reference)
    best = study.best()
    if args.json:
        print(json.dumps(json.loads((study.root / "summary.json").read_text()), indent=2))
        return 0
    console = _console()
    console.print(_summary_table(
        f"study {args.study}: {len(study.candidates)} candidates, budget "
        f"{_budget_words(study.config)} on {study.config['device']['name']}",
        [(f"best ({best.searcher})", best), ("uniform", reference["uniform"]),
         ("unpruned", reference["unpruned"])], reference["unpruned"].latency_ms, study))
    console.print(", ".join(f"{k} {v}" for k, v in paths.items()))
    return 0


# --------------------------------------------------------------------------- after the search
TOLERANCE = 1e-4  # max abs difference an exported model may show against PyTorch


def _open_finished(args):
    """A study with a finished search (a feasible best and its reference scores)."""
    from .study import Study

    study = Study.load(Path(args.runs) / args.study)
    if study.best() is None or not (study.root / "reference.json").is_file():
        raise UserError(f"study {args.study!r} has no finished search yet; run `autoprune "
                        f"search --study {args.study}` (with its original options) first")
    return study


def _study_device(study):
    from .latency.devices import TargetDevice

    d = dict(study.config["device"])
    return TargetDevice.from_dict(d.pop("name"), d, source=f"study {study.root.name!r}")


def _study_base(study, args) -> Loaded:
    """The unpruned checkpoint a study searched: ``--weights`` or the path it recorded, checked
    against the weights hash frozen in its config."""
    from .models import file_sha256

    cfg = study.config
    path = Path(args.weights) if args.weights else Path(cfg.get("weights") or DEFAULT_WEIGHTS)
    if not path.is_file():
        raise UserError(f"the base checkpoint of study {study.root.name!r} ({str(path)!r}) is "
                        "missing; pass the checkpoint it searched with `--weights`")
    if file_sha256(path) != cfg.get("weights_sha256"):
        raise UserError(f"{str(path)!r} is not the checkpoint study {study.root.name!r} "
                        "searched (its sha256 differs); pass the original with `--weights`")
    ns = argparse.Namespace(model=cfg["model"]["name"], weights=str(path), data=cfg["data"])
    loaded = _resolve_model(ns, need_weights=True)
    if loaded.policy is not None:  # pragma: no cover - search refuses pruned checkpoints
        raise UserError(f"{str(path)!r} is pruned; pass the unpruned checkpoint")
    return loaded


def _load_autoprune_checkpoint(path: Path) -> Loaded:
    """A checkpoint that carries its own model spec (and policy): nothing else to name."""
    return _resolve_model(argparse.Namespace(model=None, weights=str(path), data=None),
                          need_weights=True)


def _study_policy(study, path: str, base: Loaded):
    """A policy file checked against the study's model; groups it does not name stay whole
    (filled in, so the policy compares equal to the study's candidates)."""
    from .policy import Policy

    policy = Policy.load(path)
    groups = study.config["space"]["groups"]
    unknown = [g for g in policy if g not in groups]
    if unknown:
        raise UserError(f"policy file {path!r} names group {unknown[0]!r}, which study "
                        f"{study.root.name!r}'s model ({study.config['model']['name']}) does "
                        "not have; pass a policy of this study (best_policy.json, pareto.json "
                        "points)")
    return Policy.from_dict({**_group_widths(study, base), **policy.to_dict()})


def _group_widths(study, base: Loaded) -> dict[str, int]:
    """Each of the study's groups' channels in the unpruned model."""
    modules = dict(base.model.named_modules())
    return {g: getattr(modules[g], "out_channels", None) or modules[g].out_features
            for g in study.config["space"]["groups"]}


def _prune_for_study(study, base: Loaded, policy, data):
    """The policy's pruned model as the search scored it: same importance criterion, BN
    statistics re-estimated on training batches when the search did so."""
    from .evaluate import recalibrate_bn
    from .prune import apply_policy

    ev = study.config["evaluator"]
    pruned = apply_policy(base.model, policy, importance=ev["importance"],
                          example_input=base.example_input())
    if ev.get("adaptive_bn", True):
        recalibrate_bn(pruned, data.train, batches=ev.get("bn_batches", 10), batch_size=128,
                       seed=study.config["seed"])
    return pruned.eval()


def cmd_finetune(args) -> int:
    from .models import read_checkpoint, save_checkpoint
    from .policy import Policy
    from .train import TrainConfig, evaluate, train_device, train_resumable

    device = train_device(args.train_device)
    study = _open_finished(args)
    tag = Path(args.policy).stem if args.policy else "best"
    out = Path(args.out) if args.out else study.root / "finetune" / f"{tag}.pt"
    _check_writable(out)
    config = TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                         batch_size=args.batch_size, seed=args.seed,
                         kd_alpha=args.kd_alpha if args.distill else 0.0,
                         kd_temperature=args.kd_temperature)
    if args.screen < 1 or args.screen_epochs < 1:
        raise UserError("`--screen` and `--screen-epochs` must be positive integers, got "
                        f"{args.screen} and {args.screen_epochs}")
    if not 0 <= args.screen_distance < 1:
        raise UserError(f"`--screen-distance` must be in [0, 1), got {args.screen_distance}")
    if args.screen > 1 and args.policy:
        raise UserError("`--screen` chooses among the study's candidates and `--policy` names "
                        "one: drop one of them")
    base = _study_base(study, args)
    policy = _study_policy(study, args.policy, base) if args.policy else study.best().policy
    data = screen = None
    if args.screen > 1:
        data = _load_data(base)
        screen = _screen(study, base, data, config, args, device)
        policy = Policy.from_dict(screen["winner"])
    run_key = {"study": study.root.name, "policy": policy.to_dict(),
               "base_sha256": study.config["weights_sha256"], "config": dict(config.__dict__),
               "distill": bool(args.distill)}
    if screen is not None:
        run_key["screen"] = screen["key"]["screen"]
    if out.is_file() and not args.force:
        done = read_checkpoint(out)
        saved_key = (done.get("extra") or {}).get("run_key")
        if saved_key == run_key:
            m = done["metrics"]
            print(f"already fine-tuned: {out} (val accuracy {m['val_acc_before'] * 100:.2f}% "
                  f"-> {m['val_acc'] * 100:.2f}%); pass `--force` to train it again")
            return 0
        differs = _first_difference(saved_key, run_key)
        raise UserError(f"{str(out)!r} already holds a fine-tuned model made with other options"
                        f" ({differs}); pass `--force` to replace it or `--out` to keep both")
    data = data or _load_data(base)
    pruned = _prune_for_study(study, base, policy, data)
    val_before = evaluate(pruned, data.val)
    state_path = out.with_name(out.name + ".train-state")
    pruned.to(device)
    history = train_resumable(pruned, data, config, state_path=state_path, run_key=run_key,
                              teacher=base.model if args.distill else None,
                              progress=not args.quiet, announce=print)
    pruned.eval()
    val_after = evaluate(pruned, data.val)
    pruned.cpu()  # checkpoints hold CPU tensors, whatever trained them
    base.model.cpu()
    save_checkpoint(out, pruned, model_spec=base.spec, data_spec=base.data_spec,
                    input_shape=base.input_shape,
                    metrics={"val_acc": val_after, "val_acc_before": val_before},
                    extra={"policy": policy.to_dict(), "study": study.root.name,
                           "base_sha256": study.config["weights_sha256"],
                           "finetune": {**config.__dict__, "distill": bool(args.distill)},
                           "train_device": str(device), "screen": _screen_summary(screen),
                           "history": history, "run_key": run_key})
    state_path.unlink(missing_ok=True)
    if args.json:
        print(json.dumps({"checkpoint": str(out), "policy": policy.to_dict(),
                          "val_acc_before": val_before, "val_acc": val_after,
                          "epochs": args.epochs, "distill": bool(args.distill),
                          "screen": _screen_summary(screen)}, indent=2))
        return 0
    if screen is not None:
        _print_screen(screen, study)
    print(f"fine-tuned {tag} policy of study {study.root.name} for {args.epochs} epoch(s)"
          + (" with distillation from the unpruned model" if args.distill else ""))
    print(f"val accuracy {val_before * 100:.2f}% -> {val_after * 100:.2f}% "
          f"({len(data.val)} images)")
    print(f"checkpoint {out}")
    return 0


def _screen(study, base: Loaded, data, config, args, train_dev) -> dict:
    """`finetune --screen K`: the study's K leading distinct candidates that fit the budget,
    each fine-tuned for ``--screen-epochs``; returns the screen's record (`screen.run_screen`),
    whose ``winner`` is fine-tuned in full. See `autoprune.screen`."""
    import dataclasses

    from .evaluate import VERIFY_SECONDS, budget_measurer, watched_measurer
    from .latency.devices import availability
    from .progress import bar
    from .screen import pick_contenders, run_screen
    from .train import evaluate, train

    full = _group_widths(study, base)
    device = _study_device(study)
    tolerance = study.measured.get("tolerance")
    usable, why = availability(device)
    short = dataclasses.replace(config, epochs=args.screen_epochs)
    key = {"study": study.root.name, "base_sha256": study.config["weights_sha256"],
           "screen": {"contenders": args.screen, "epochs": args.screen_epochs,
                      "distance": args.screen_distance},
           "config": dict(short.__dict__), "distill": bool(args.distill)}
    with contextlib.ExitStack() as stack:
        if tolerance is None or not usable:
            # the search trusted its predictions (`--verify-top 0`) or cannot reach the device
            print(f"note: the screen's contenders are not measured on {device.name} ("
                  + ("the search's measured check was off" if tolerance is None else why)
                  + "): they fit the budget as predicted")

            def fits(c) -> bool:
                return True
        else:
            backend = stack.enter_context(_backend(device, args))
            ns = argparse.Namespace(space=None, round_to=study.config["space"]["round_to"])
            space = _build_space(base, ns, coupled_round_to=device.channel_multiple)
            budget = study.config["budget"]
            measure = watched_measurer(
                budget_measurer(backend, base.model, space, fraction=budget.get("fraction"),
                                budget_ms=budget.get("ms")), seconds=VERIFY_SECONDS)

            def fits(c) -> bool:
                return study.measurement(c.policy, measure)["over_budget"] <= 1 + tolerance
        with _console().status(f"choosing up to {args.screen} contenders (measured on "
                               f"{device.name})"):
            contenders = pick_contenders(study.candidates, study.best(), args.screen,
                                         full=full, distance=args.screen_distance, fits=fits,
                                         max_tries=4 * args.screen)

    def train_one(policy) -> dict:
        pruned = _prune_for_study(study, base, policy, data)
        before = evaluate(pruned, data.val)
        pruned.to(train_dev)
        train(pruned, data, short, teacher=base.model if args.distill else None)
        pruned.eval()
        after = evaluate(pruned, data.val)
        pruned.cpu()
        base.model.cpu()
        return {"val_acc_before": before, "val_acc": after}

    with bar(f"screen: {len(contenders)} contenders x {args.screen_epochs} epoch(s)",
             len(contenders), enabled=not args.quiet) as pbar:
        return run_screen(contenders, train_one,
                          path=study.root / "finetune" / "screen.json", key=key,
                          on_done=lambda i, r: pbar.advance())


def _screen_summary(screen: dict | None) -> dict | None:
    """What a fine-tuned checkpoint and `finetune --json` keep of its screen."""
    if screen is None:
        return None
    return {**screen["key"]["screen"], "screened": len(screen["results"]),
            "winner_rank": screen["winner_rank"],
            "val_acc": [r["val_acc"] for r in screen["results"]]}


def _print_screen(screen: dict, study) -> None:
    from rich.table import Table

    table = Table(title=f"screen of study {study.root.name}: "
                  f"{screen['key']['screen']['epochs']} epoch(s) each, val accuracy")
    for col in ("", "search score", "predicted ms", "MACs", "before", "after"):
        table.add_column(col, justify="right" if col else "left")
    for i, r in enumerate(screen["results"]):
        table.add_row(("* " if i == screen["winner_rank"] else "  ") +
                      ("best" if i == 0 else f"#{i + 1}"), f"{r['search_val_acc']:.2%}",
                      f"{r['predicted_ms']:.4f}", f"{r['macs'] / 1e6:.2f} M",
                      f"{r['val_acc_before']:.2%}", f"{r['val_acc']:.2%}")
    _console().print(table)


def _first_difference(saved, now) -> str:
    """'key saved vs now' for the first differing (nested) key of two run keys."""
    if not isinstance(saved, dict):
        return "not an autoprune fine-tune"

    def flat(d: dict) -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update({f"{k}.{k2}": v2 for k2, v2 in v.items()})
            else:
                out[k] = v
        return out

    a, b = flat(saved), flat(now)
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            return f"{k} {a.get(k)!r} vs now {b.get(k)!r}"
    return "unknown difference"


FORMATS = ("onnx", "tvm", "torch")


def cmd_export(args) -> int:
    import tempfile

    import torch

    from .count import count_macs, count_params
    from .export import (
        check_onnx,
        check_torch_program,
        export_onnx,
        export_torch_program,
        export_tvm,
        max_abs_diff,
        tvm_export_device,
    )
    from .models import read_checkpoint, save_checkpoint
    from .report import build_report, measure_pair, rows, write_report
    from .train import evaluate

    if args.rounds < 1:
        raise UserError(f"`--rounds` must be >= 1, got {args.rounds}")
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UserError(f"`--format` takes a comma-separated list of {', '.join(FORMATS)}, got "
                        f"{args.format!r}")
    study = _open_finished(args)
    out_dir = Path(args.out) if args.out else study.root / "export"
    _check_writable(out_dir / "report.json")
    device = _study_device(study)
    base = _study_base(study, args)
    data = _load_data(base)
    name = study.root.name

    ckpt_path = Path(args.checkpoint) if args.checkpoint else study.root / "finetune" / "best.pt"
    finetune = None
    if ckpt_path.is_file():
        ckpt = read_checkpoint(ckpt_path)
        extra = ckpt.get("extra") or {}
        if extra.get("base_sha256") != study.config["weights_sha256"] or not extra.get("policy"):
            raise UserError(f"{str(ckpt_path)!r} was not fine-tuned from study {name!r}'s base "
                            "model; pass a checkpoint written by `autoprune finetune --study "
                            f"{name}`")
        tuned = _load_autoprune_checkpoint(ckpt_path)
        policy, pruned = tuned.policy, tuned.model
        ft = extra.get("finetune") or {}
        finetune = {"checkpoint": str(ckpt_path), "epochs": ft.get("epochs"),
                    "distill": bool(ft.get("distill")), "val_acc": ckpt["metrics"].get("val_acc")}
    elif args.checkpoint:
        raise UserError(f"checkpoint {args.checkpoint!r} not found; check `--checkpoint`")
    else:
        policy = study.best().policy
        pruned = None
        print(f"note: study {name} has no fine-tuned model ({ckpt_path}); exporting the pruned "
              "model as the search scored it. Run `autoprune finetune --study "
              f"{name} --epochs N --distill` first for a deployable accuracy.")
    before = _prune_for_study(study, base, policy, data)
    pruned = before if pruned is None else pruned.eval()
    logged = {c.policy: c for c in study.candidates}
    cand = logged.get(policy)

    batch = device.batch
    example = torch.zeros(batch, *base.input_shape[1:])
    check_x = data.test.x[:max(64, batch)]
    artefacts: dict = {}
    failures = []

    def note(key, entry):
        entry["bytes"] = Path(entry["path"]).stat().st_size
        artefacts[key] = entry
        diff = entry.get("max_abs_diff")
        if diff is not None and not diff <= TOLERANCE:
            failures.append(f"{key} differs from PyTorch by {diff:.2e} (> {TOLERANCE:g})")

    console = _console()
    if "onnx" in formats:
        with console.status("exporting ONNX"):
            path = export_onnx(pruned, example, out_dir / "model.onnx",
                               dynamic_batch=not args.static_batch)
            note("onnx", {"path": str(path), "dynamic_batch": not args.static_batch,
                          "max_abs_diff": check_onnx(path, pruned, check_x,
                                                     batch=batch if args.static_batch
                                                     else None)})
    if "tvm" in formats:
        tdev = tvm_export_device(device)
        with console.status(f"compiling for TVM target {json.dumps(tdev.target)}"):
            entry = export_tvm(pruned, example, out_dir / "model.so", tdev,
                               tuning_dir=_tables_root(args) / device.name / "tuning",
                               check_inputs=check_x)
        note("tvm", entry)
    if "torch" in formats:
        path = save_checkpoint(out_dir / "model.pt", pruned, model_spec=base.spec,
                               data_spec=base.data_spec, input_shape=base.input_shape,
                               metrics={} if finetune is None else {"val_acc":
                                                                    finetune["val_acc"]},
                               extra={"policy": policy.to_dict(), "study": name,
                                      "base_sha256": study.config["weights_sha256"]})
        rebuilt = _load_autoprune_checkpoint(path).model
        diff = max_abs_diff(lambda x: rebuilt(x).numpy(), pruned, check_x, batch=len(check_x))
        note("torch", {"path": str(path), "max_abs_diff": diff,
                       "rebuild": "autoprune.models: read_checkpoint + build_model + "
                                  "apply_policy + load_state (no pickled code)"})
        path = export_torch_program(pruned, example, out_dir / "model.pt2",
                                    dynamic_batch=not args.static_batch)
        note("torch_export", {"path": str(path), "dynamic_batch": not args.static_batch,
                              "max_abs_diff": check_torch_program(path, pruned, check_x)})

    with console.status(f"measuring unpruned and pruned on {device.name}"), \
            _backend(device, args) as backend:
        lat_u, lat_p = measure_pair(backend, base.model, pruned, base.input_shape,
                                    rounds=args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {}
        for key, model in (("unpruned", base.model), ("pruned", pruned)):
            sizes[key] = export_onnx(model, example, Path(tmp) / f"{key}.onnx").stat().st_size
    ref = json.loads((study.root / "reference.json").read_text())
    x = base.example_input()
    unpruned = {"latency": lat_u, "predicted_ms": ref["unpruned"]["latency_ms"],
                "macs": count_macs(base.model, x), "params": count_params(base.model),
                "onnx_bytes": sizes["unpruned"], "test_acc": evaluate(base.model, data.test)}
    pruned_d = {"latency": lat_p, "predicted_ms": cand.latency_ms if cand else None,
                "val_acc_search": cand.val_acc if cand else None,
                "macs": count_macs(pruned, x), "params": count_params(pruned),
                "onnx_bytes": sizes["pruned"],
                "test_acc_before_finetune": evaluate(before, data.test),
                "test_acc_after_finetune": None if finetune is None
                else evaluate(pruned, data.test)}
    report = build_report(study=name, device=study.config["device"],
                          budget_ms=study.config["budget_ms"],
                          budget=study.config.get("budget"), policy=policy.to_dict(),
                          check_scale=(study.config.get("budget_check") or {}).get("scale"),
                          searcher=cand.searcher if cand else None, unpruned=unpruned,
                          pruned=pruned_d, artefacts=artefacts, finetune=finetune)
    json_path, md_path = write_report(report, out_dir)
    policy.save(out_dir / "policy.json")  # what was cut, for `autoprune prune` / `measure`
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        from rich.table import Table

        table = Table(title=f"study {name} on {device.name}: unpruned vs pruned (measured)")
        for col in ("", "unpruned", "pruned"):
            table.add_column(col, justify="left" if not col else "right")
        for row in rows(report):
            table.add_row(*row)
        console.print(table)
        for key, a in artefacts.items():
            diff = a.get("max_abs_diff")
            check = f"max abs diff {diff:.2e}" if diff is not None else \
                f"not checked: {a.get('unchecked')}"
            console.print(f"{key:13s} {a['path']} ({a['bytes']:,} bytes; {check})")
        console.print(f"report       {json_path} and {md_path}")
    for key, lat in (("unpruned", lat_u), ("pruned", lat_p)):
        if not lat["settled"]:
            log.warning("the %s model's latency never settled over %d rounds (%s ms): the "
                        "machine was busy throughout; the same export command measures again",
                        key, len(lat["rounds_ms"]), ", ".join(f"{v:.4f}" for v in lat["rounds_ms"]))
    if failures:
        print("autoprune: error: " + "; ".join(failures) + " (an export bug: please report it)",
              file=sys.stderr)
        return 1
    return 0


def _check_writable(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create folder {str(parent)!r} ({e.strerror}); choose another "
                        "`--out`") from e
    if not os.access(parent, os.W_OK):
        raise UserError(f"folder {str(parent)!r} is not writable; choose another `--out`")


# --------------------------------------------------------------------------- parser
def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="zoo name (resnet20, resnet56, plain20, mobilenetv2, vgg11) "
                   "or path/to/file.py:factory; default: the shipped Fashion-MNIST ResNet-20")
    p.add_argument("--weights", help="checkpoint (.pt); an autoprune checkpoint alone is enough")
    p.add_argument("--data", help="fashion-mnist[:DIR], digits, cifar10:DIR, imagefolder:DIR")


def _add_space_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", help="search-space YAML (default: search_spaces/<family>.yaml)")
    p.add_argument("--round-to", type=int, help="channel multiple (overrides the YAML)")


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target-device", required=True, help="a device of `autoprune devices`")
    p.add_argument("--devices", help="YAML file of your own devices (added to the built-ins)")
    p.add_argument("--trials-per-task", type=int,
                   help="MetaSchedule trials per task for a tuned TVM device")
    p.add_argument("--tables", help="folder of latency tables (default: latency_tables/)")


def _device_command(sub, name: str, help_: str) -> argparse.ArgumentParser:
    """A subcommand that works on a model for a target device."""
    p = sub.add_parser(name, help=help_)
    _add_device_args(p)
    _add_model_args(p)
    _add_space_args(p)
    return p


class _Parser(argparse.ArgumentParser):
    """A bad argument gets one line (argparse prints its whole usage first), exit 2."""

    def error(self, message):
        self.exit(2, f"autoprune: error: {message}; see `{self.prog} --help`\n")


def _add_train_device_arg(p) -> None:
    p.add_argument("--train-device", default="cpu", metavar="DEV",
                   help="where PyTorch trains: cpu (default), cuda or cuda:N; the checkpoint is "
                   "the same either way (CPU tensors)")


def build_parser() -> argparse.ArgumentParser:
    from .latency.stats import VALIDATE_PASSES

    parser = _Parser(
        prog="autoprune",
        description="Prune a trained PyTorch CNN for a named target device.")
    parser.add_argument("--version", action="version", version=f"autoprune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--threads", type=int, default=None,
                        help="PyTorch CPU threads (default: all cores)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a model and write a checkpoint")
    p.add_argument("--model", required=True, help="zoo name or path/to/file.py:factory")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="checkpoint path to write")
    _add_train_device_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("space", help="print a model's prunable channel groups")
    _add_model_args(p)
    _add_space_args(p)
    p.add_argument("--target-device", help="the space a search for this device uses: its "
                   "channel multiple (unless --round-to), residual streams always on it")
    p.add_argument("--devices", help="YAML file of your own devices (added to the built-ins)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_space)

    p = sub.add_parser("evaluate", help="accuracy of a checkpoint on a data split")
    _add_model_args(p)
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("prune", help="apply a policy JSON and write the smaller model")
    _add_model_args(p)
    _add_space_args(p)
    p.add_argument("--policy", required=True,
                   help='JSON file: {"channels": {"group": channels_kept, ...}}')
    p.add_argument("--importance", default="l1",
                   choices=("l1", "l2", "bn-scale", "taylor", "fpgm", "random"))
    p.add_argument("--out", required=True, help="pruned checkpoint to write")
    p.add_argument("--onnx", help="also export the pruned model to this ONNX file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("devices", help="list target devices and whether each is usable here")
    p.add_argument("--devices", help="YAML file of your own devices (added to the built-ins)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_devices)

    p = _device_command(sub, "measure", "measure a whole model's latency on a target device")
    p.add_argument("--policy", help="prune with this policy JSON first")
    p.add_argument("--per-op", action="store_true", help="also print a per-kernel breakdown")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_measure)

    p = _device_command(sub, "profile", "build the latency table of a model on a device")
    p.add_argument("--table", help="table path (default latency_tables/<device>/<model>.json)")
    p.add_argument("--rebuild", action="store_true", help="discard the existing table")
    p.add_argument("--recalibrate", action="store_true",
                   help="fit the calibration again on new whole-model runs, keeping the op "
                        "entries")
    p.add_argument("--calibrate", type=int,
                   help="random policies measured whole to calibrate (plus full and smallest; "
                   "default 16, or 32 for a model with depthwise convs, whose own scale needs "
                   "more)")
    p.add_argument("--validate", type=int, metavar="N",
                   help="measure N random policies whole and report the predictor's error")
    p.add_argument("--validate-rounds", type=int, default=VALIDATE_PASSES, metavar="R",
                   help="passes over the validation policies, alternating direction; each "
                        "policy's latency is its quickest pass (noise here only adds time; "
                        f"default {VALIDATE_PASSES})")
    p.add_argument("--seed", type=int, default=1, help="seed of the validation policies")
    p.add_argument("--out", help="folder for the validation JSON and PNG (runs/validation)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_profile)

    p = _device_command(sub, "predict", "predicted latency of a policy from a latency table")
    p.add_argument("--policy", help="policy JSON (default: the unpruned model)")
    p.add_argument("--table", help="table path (default latency_tables/<device>/<model>.json)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = _device_command(sub, "search", "find the best pruning policy under a latency budget")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--latency-budget", type=float, metavar="F",
                   help="fraction of the unpruned model's predicted latency, in (0, 1]")
    g.add_argument("--latency-budget-ms", type=float, metavar="MS", help="budget in ms")
    p.add_argument("--searcher", choices=("amc", "evolution", "uniform", "random"),
                   default="evolution")
    p.add_argument("--trials", type=int, help="candidates in total (default 100; amc: distinct "
                   "candidates; uniform: its best and up to two cheaper fallbacks)")
    p.add_argument("--study", help="study name (folder under --runs); re-run to resume")
    p.add_argument("--runs", default="runs", help="folder of study folders")
    p.add_argument("--storage", help="evolution: Optuna RDB URL shared by several workers "
                   "(default: SQLite in the study folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--population", type=int, default=32, help="evolution: population size")
    p.add_argument("--sampler", choices=("nsga2", "cmaes", "tpe"), default="nsga2")
    p.add_argument("--reward", choices=("acc", "acc-log-latency"), default="acc",
                   help="amc: reward at the end of an episode")
    p.add_argument("--warmup-episodes", type=int, default=10, help="amc: random episodes")
    p.add_argument("--amc-action", choices=("share", "reach", "bounds", "wall"), default="share",
                   help="amc: an action scales the group's fair share of the latency the "
                   "budget still leaves, 0 to twice it (default); reach: as share up to 0.5, "
                   "then on to all the budget leaves; bounds: spans the group's bounds, "
                   "clipped by the action wall (AMC); wall: the group's minimum to the most "
                   "the wall allows")
    p.add_argument("--amc-actor-reg", type=float, metavar="W",
                   help="amc: weight of the penalty on the actor's pre-tanh activation beyond "
                   "+-2, which keeps it from saturating (default 1; 0: off, as in studies made "
                   "before it)")
    p.add_argument("--amc-warmup-policies", choices=("seeds", "random"), default="seeds",
                   help="amc: the first episodes evaluate evolution's seeds (the uniform policy, "
                   "then one per group with that group kept whole) in place of the policies "
                   "they build, and the agent learns from those (default); random: the random "
                   "warm-up alone (AMC, and studies made before seeds)")
    p.add_argument("--amc-update-ratio", type=float, metavar="R",
                   help="amc: gradient steps after each episode, per group (default: the "
                   "searcher's, see `autoprune.search.amc`; 1: AMC's one per group)")
    p.add_argument("--amc-repeats", choices=("move", "replay"), default="move",
                   help="amc: an episode that builds a policy an earlier one evaluated "
                   "evaluates a feasible neighbour not yet evaluated, and the agent learns from "
                   "it (default), or is served from the cache and evaluates nothing (AMC, and "
                   "studies made before moves)")
    p.add_argument("--val-images", type=int, default=2000, help="val images per candidate")
    p.add_argument("--no-adaptive-bn", action="store_true",
                   help="skip BN recalibration of pruned candidates")
    p.add_argument("--importance", default="l1",
                   choices=("l1", "l2", "bn-scale", "fpgm", "random"))
    p.add_argument("--budget-check", type=int, default=8, metavar="K",
                   help="before a new study's search, measure K policies the latency table puts "
                   "at the budget on the device, and search to the budget they say (the table "
                   "is scaled by up to 1.25 either way there); 0: trust the table. A resumed "
                   "study keeps the check it was made with")
    p.add_argument("--verify-top", type=int, default=10, metavar="K",
                   help="at the end, measure the best candidates on the device (at most K, most "
                   "accurate first) until one is within the budget; if none is, up to K more "
                   "that the predictor, rescaled by those measurements, says fit; 0: trust the "
                   "predictor")
    p.add_argument("--verify-tolerance", type=float, default=0.05, metavar="T",
                   help="measured latency may exceed the budget by this fraction (default 0.05: "
                   "the noise of re-measuring one model here is about 2.5%%)")
    p.add_argument("--verify-seconds", type=float, default=10.0, metavar="S",
                   help="the measured check watches the machine's state for S seconds at least, "
                   "and measures a candidate caught in a slow moment again for up to S seconds "
                   "(this machine has slow spells of seconds to minutes); 0: one measurement a "
                   "candidate")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("finetune", help="fine-tune a study's best (or any) pruned policy")
    p.add_argument("--study", required=True)
    p.add_argument("--runs", default="runs", help="folder of study folders")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--distill", action="store_true",
                   help="distil from the unpruned model (soft targets)")
    p.add_argument("--kd-alpha", type=float, default=0.9, help="weight of the distillation term")
    p.add_argument("--kd-temperature", type=float, default=4.0)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policy", help="fine-tune this policy JSON (e.g. a Pareto point) instead "
                   "of the study's best")
    p.add_argument("--screen", type=int, default=1, metavar="K",
                   help="fine-tune the study's K leading distinct candidates that fit the "
                   "budget (measured on the device) for --screen-epochs each, then the one "
                   "with the best val accuracy for --epochs (default 1: the study's best)")
    p.add_argument("--screen-epochs", type=int, default=1)
    p.add_argument("--screen-distance", type=float, default=0.1,
                   help="contenders differ by at least this mean fraction of each group's "
                   "channels")
    p.add_argument("--weights", help="the study's base checkpoint, if it has moved")
    p.add_argument("--tables", help="folder of latency tables (TVM tuning databases), for "
                   "--screen's measurements")
    p.add_argument("--out", help="checkpoint to write (default runs/<study>/finetune/<policy>.pt)")
    p.add_argument("--force", action="store_true", help="train again even if already done")
    _add_train_device_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("export", help="export a study's pruned model and a measured report")
    p.add_argument("--study", required=True)
    p.add_argument("--runs", default="runs", help="folder of study folders")
    p.add_argument("--format", default="onnx,tvm,torch",
                   help="comma-separated: onnx, tvm, torch (default all three)")
    p.add_argument("--out", help="output folder (default runs/<study>/export)")
    p.add_argument("--checkpoint", help="fine-tuned checkpoint to export (default "
                   "runs/<study>/finetune/best.pt, else the unfine-tuned best policy)")
    p.add_argument("--static-batch", action="store_true",
                   help="fix the batch size (the device's) in ONNX and torch.export")
    p.add_argument("--rounds", type=int, default=10,
                   help="alternating measurement rounds, at least (more are added until they "
                        "span 5 s, and while a busy spell holds most of them back)")
    p.add_argument("--weights", help="the study's base checkpoint, if it has moved")
    p.add_argument("--tables", help="folder of latency tables (TVM tuning databases)")
    p.add_argument("--trials-per-task", type=int,
                   help="MetaSchedule trials per task for a tuned TVM device")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="a study's summary table and Pareto plot")
    p.add_argument("--study", required=True)
    p.add_argument("--runs", default="runs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise UserError(f"`--threads` must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        return args.func(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"autoprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
