"""The real command in a subprocess: outputs, and every bad input -> one line, exit 2."""

import json

import pytest
import torch

from autoprune import __version__
from autoprune.policy import Policy

from .conftest import assert_user_error, run_cli


def test_version_and_help():
    proc = run_cli("--version", check=True)
    assert proc.stdout.strip() == f"autoprune {__version__}"
    proc = run_cli("--help", check=True)
    for cmd in ("train", "space", "evaluate", "prune"):
        assert cmd in proc.stdout


def test_train_writes_checkpoint_with_metadata(digits_ckpt):
    from autoprune.models import read_checkpoint

    ckpt = read_checkpoint(digits_ckpt)
    assert ckpt["model"]["name"] == "resnet20" and ckpt["data"] == "digits"
    assert ckpt["input_shape"] == [1, 1, 8, 8]
    assert 0.5 < ckpt["metrics"]["test_acc"] <= 1.0
    assert len(ckpt["extra"]["history"]["val_acc"]) == 3


def test_space_table_and_json(digits_ckpt):
    proc = run_cli("space", "--weights", digits_ckpt, check=True)
    assert "layer2.0.conv2" in proc.stdout and "MACs" in proc.stdout
    proc = run_cli("space", "--model", "resnet56", "--data", "digits", "--json", check=True)
    out = json.loads(proc.stdout)
    assert len(out["groups"]) == 30 and out["model"]["name"] == "resnet56"
    proc = run_cli("space", "--weights", digits_ckpt, "--round-to", "8", "--json", check=True)
    assert all(g["round_to"] == 8 for g in json.loads(proc.stdout)["groups"])
    # for a device, the space its search uses: a finer grid, residual streams on its multiple
    proc = run_cli("space", "--weights", digits_ckpt, "--target-device", "cpu-ort",
                   "--round-to", "4", "--json", check=True)
    out = json.loads(proc.stdout)
    assert out["device"] == "cpu-ort"
    streams = {g["name"] for g in out["groups"] if sum(m.endswith(":out")
                                                       for m in g["members"]) > 1}
    assert streams and all(g["round_to"] == (8 if g["name"] in streams else 4)
                           for g in out["groups"] if g["channels"] >= 8)
    proc = run_cli("space", "--weights", digits_ckpt, "--target-device", "cpu-ort", check=True)
    assert "as searched for cpu-ort" in proc.stdout
    assert_user_error(run_cli("space", "--weights", digits_ckpt, "--target-device", "nope"),
                      "nope")


def test_evaluate_matches_checkpoint(digits_ckpt):
    from autoprune.models import read_checkpoint

    proc = run_cli("evaluate", "--weights", digits_ckpt, "--json", check=True)
    out = json.loads(proc.stdout)
    assert out["split"] == "test" and out["images"] == 359
    assert out["accuracy"] == pytest.approx(read_checkpoint(digits_ckpt)["metrics"]["test_acc"])


def test_prune_writes_smaller_model_and_onnx(digits_ckpt, tmp_path):
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps({"channels": {"conv1": 8, "layer3.0.conv1": 32}}))
    out, onnx = tmp_path / "pruned.pt", tmp_path / "pruned.onnx"
    proc = run_cli("prune", "--weights", digits_ckpt, "--policy", policy, "--out", out,
                   "--onnx", onnx, "--json", check=True)
    res = json.loads(proc.stdout)
    assert res["after"]["macs"] < res["before"]["macs"]
    assert res["policy"]["conv1"] == 8 and res["policy"]["layer3.2.conv1"] == 64
    assert res["onnx"]["max_abs_diff"] <= 1e-4
    # the pruned checkpoint alone rebuilds the pruned model
    proc = run_cli("evaluate", "--weights", out, "--split", "val", "--json", check=True)
    assert json.loads(proc.stdout)["accuracy"] == pytest.approx(res["after"]["val_acc"])
    proc = run_cli("space", "--weights", out, "--json", check=True)
    assert {g["name"]: g["channels"] for g in json.loads(proc.stdout)["groups"]}["conv1"] == 8


# ----------------------------------------------------------------------------- bad input
def test_bad_arguments_get_one_line():
    assert_user_error(run_cli("search", "--target-device", "cpu-ort", "--latency-budget", "0.5",
                              "--amc-action", "nope"),
                      "invalid choice: 'nope'", "autoprune search --help")
    assert_user_error(run_cli("search", "--target-device", "cpu-ort"),
                      "--latency-budget", "required")
    assert_user_error(run_cli("frobnicate"), "invalid choice", "autoprune --help")
    base = ("search", "--target-device", "cpu-ort", "--latency-budget", "0.5")
    assert_user_error(run_cli(*base, "--verify-top", "-1"), "`--verify-top` must be >= 0")
    assert_user_error(run_cli(*base, "--verify-tolerance", "1.5"),
                      "`--verify-tolerance` must be in [0, 1)")
    assert_user_error(run_cli(*base, "--searcher", "amc", "--amc-actor-reg", "-0.1"),
                      "`--amc-actor-reg` must be >= 0")
    assert_user_error(run_cli(*base, "--budget-check", "-2"), "`--budget-check` must be >= 0")
    for bad in ("0", "-1", "nan", "5"):
        assert_user_error(run_cli(*base, "--searcher", "amc", "--amc-update-ratio", bad),
                          "`--amc-update-ratio` must be in (0, 4]")
    for bad in ("-1", "nan", "inf"):
        assert_user_error(run_cli(*base, "--verify-seconds", bad),
                          "`--verify-seconds` must be a finite number >= 0")
    assert_user_error(run_cli(*base, "--searcher", "amc", "--storage", "sqlite:///x.db"),
                      "`--searcher amc` runs in one process", "drop `--storage`")
    assert_user_error(run_cli(*base, "--searcher", "amc", "--amc-repeats", "sometimes"),
                      "invalid choice: 'sometimes'")


def test_search_defaults_are_the_library_defaults_they_stand_for():
    """The parser spells some defaults out (it does not import the torch-heavy modules that
    define them): they must not drift from those."""
    import inspect

    from autoprune.cli import build_parser
    from autoprune.evaluate import VERIFY_SECONDS
    from autoprune.search.amc import AMCSearcher

    args = build_parser().parse_args(["search", "--target-device", "cpu-ort",
                                      "--latency-budget", "0.5"])
    assert args.verify_seconds == VERIFY_SECONDS
    amc = inspect.signature(AMCSearcher).parameters
    assert (args.warmup_episodes, args.amc_action, args.amc_repeats,
            args.amc_warmup_policies) == \
        (amc["warmup_episodes"].default, amc["action"].default, amc["repeats"].default,
         amc["warmup_policies"].default)


def test_an_unreachable_storage_is_refused_before_the_study_is_made(tmp_path):
    """`--storage` is connected to first: a server that refuses, a SQLite file whose folder is
    missing or a driver that is not installed gets one line (a password in the URL is not
    repeated), and no study folder is left half-made."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = tmp_path / "runs"
    base = ("search", "--target-device", "cpu-ort", "--latency-budget", "0.5", "--searcher",
            "evolution", "--study", "s", "--runs", runs, "--storage")
    line = assert_user_error(run_cli(*base, f"postgresql://me:hunter2@127.0.0.1:{port}/db"),
                             "cannot connect to `--storage`", "Connection refused",
                             "check that the database server runs")
    assert "hunter2" not in line and "me:***@" in line
    assert_user_error(run_cli(*base, f"sqlite:///{tmp_path / 'missing' / 'x.db'}"),
                      "unable to open database file", "folder exists")
    assert_user_error(run_cli(*base, "mysql://me@127.0.0.1/db"), "needs the database driver")
    for url, words in ((f"postgresql://me:hunter2@127.0.0.1:{port}x/db", "not a database URL"),
                       ("redis://me:hunter2@127.0.0.1/0", "must be an RDB URL")):
        line = assert_user_error(run_cli(*base, url), words)  # a port that is no number, and
        assert "hunter2" not in line and "me:***@" in line  # a scheme that is refused
    assert not runs.exists()


def test_unknown_zoo_name():
    assert_user_error(run_cli("space", "--model", "resnet99", "--data", "digits"),
                      "unknown model 'resnet99'", "resnet20", "vgg11")


def test_model_file_missing(tmp_path):
    assert_user_error(run_cli("space", "--model", f"{tmp_path}/nope.py:make", "--data",
                              "digits"), "nope.py", "not found")


def test_factory_not_found_and_raising(tmp_path):
    f = tmp_path / "net.py"
    f.write_text("def make(num_classes, in_channels):\n    raise RuntimeError('boom')\n")
    assert_user_error(run_cli("space", "--model", f"{f}:build", "--data", "digits"),
                      "factory 'build' not found", "make")
    assert_user_error(run_cli("space", "--model", f"{f}:make", "--data", "digits"),
                      "raised RuntimeError: boom")
    g = tmp_path / "broken.py"
    g.write_text("import nonexistent_module_xyz\n")
    assert_user_error(run_cli("space", "--model", f"{g}:make", "--data", "digits"),
                      "ModuleNotFoundError")


def test_checkpoint_for_another_architecture(digits_ckpt, tmp_path):
    bare = tmp_path / "bare.pt"
    from autoprune.models import read_checkpoint

    torch.save(read_checkpoint(digits_ckpt)["state_dict"], bare)
    line = assert_user_error(run_cli("evaluate", "--model", "resnet56", "--weights", bare,
                                     "--data", "digits"), "does not fit")
    assert "layer1.3" in line
    assert_user_error(run_cli("evaluate", "--model", "resnet56", "--weights", digits_ckpt),
                      "differs from the model 'resnet20'")


def test_unreadable_checkpoint(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x80\x04garbage")
    assert_user_error(run_cli("evaluate", "--weights", junk), "unreadable")
    assert_user_error(run_cli("evaluate", "--weights", tmp_path / "none.pt"), "not found")


def test_dataset_folder_missing_or_wrong(tmp_path):
    assert_user_error(run_cli("train", "--model", "resnet20", "--data",
                              f"fashion-mnist:{tmp_path}/fm", "--epochs", "1", "--out",
                              tmp_path / "m.pt"), "not found", "idx")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "readme.txt").write_text("hi")
    assert_user_error(run_cli("train", "--model", "resnet20", "--data", f"cifar10:{tmp_path}/c",
                              "--epochs", "1", "--out", tmp_path / "m.pt"),
                      "lacks data_batch", "cifar-10-batches-py")
    assert_user_error(run_cli("train", "--model", "resnet20", "--data",
                              f"imagefolder:{tmp_path}/c", "--epochs", "1", "--out",
                              tmp_path / "m.pt"), "class subfolder")
    assert not (tmp_path / "m.pt").exists()


def test_train_device_that_is_not_there(tmp_path):
    import torch

    out = tmp_path / "m.pt"
    out.write_bytes(b"precious")
    args = ("train", "--model", "resnet20", "--data", "digits", "--epochs", "1", "--out", out)
    for bad in ("tpu", "cuda:x"):
        assert_user_error(run_cli(*args, "--train-device", bad), "`--train-device`", "cuda:N")
    if not torch.cuda.is_available():  # this machine and CI's: refused before any work
        assert_user_error(run_cli(*args, "--train-device", "cuda"), "no CUDA device",
                          "--train-device cpu")
    assert out.read_bytes() == b"precious"


def test_bad_policy_json(digits_ckpt, tmp_path):
    p = tmp_path / "p.json"
    out = tmp_path / "out.pt"
    out.write_bytes(b"precious")
    Policy.from_dict({"layer9.conv1": 4}).save(p)
    assert_user_error(run_cli("prune", "--weights", digits_ckpt, "--policy", p, "--out", out),
                      "unknown group 'layer9.conv1'")
    Policy.from_dict({"conv1": 2}).save(p)
    assert_user_error(run_cli("prune", "--weights", digits_ckpt, "--policy", p, "--out", out),
                      "keeps 2 channels", "[4, 16]")
    p.write_text("{not json")
    assert_user_error(run_cli("prune", "--weights", digits_ckpt, "--policy", p, "--out", out),
                      "not valid JSON")
    assert out.read_bytes() == b"precious"  # nothing already saved is touched


def test_malformed_space_yaml(digits_ckpt, tmp_path):
    y = tmp_path / "s.yaml"
    y.write_text("min_keep: 0.3\nround_too: 8\n")
    assert_user_error(run_cli("space", "--weights", digits_ckpt, "--space", y),
                      "unknown key 'round_too'")
    y.write_text("overrides:\n  - min_keep: 0.5\n")
    assert_user_error(run_cli("space", "--weights", digits_ckpt, "--space", y),
                      "overrides[0]", "match")


def test_wrong_input_shape(digits_ckpt):
    assert_user_error(run_cli("evaluate", "--weights", digits_ckpt, "--data", "fashion-mnist"),
                      "inputs [1, 28, 28]", "[1, 8, 8]")


def test_debug_shows_traceback():
    proc = run_cli("--debug", "space", "--model", "resnet99", "--data", "digits")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_progress_bar_in_a_log_and_finished_early(capsys):
    """Written to a log (not a terminal), the bar prints plain lines `tail -f` can follow; a
    bar whose total was only an upper bound (the measured check) ends complete."""
    from autoprune.progress import bar

    with bar("measure on cpu-ort", 42, enabled=True, fields="best {task.fields[best]}") as b:
        b.advance(3, best="0.91")
        b.finish()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("measure on cpu-ort 42/42 elapsed") and last.endswith("best 0.91")


def test_progress_eta_of_a_resumed_run_is_its_own_pace(capsys, monkeypatch):
    """A resumed run (90 of 100 steps done before) that takes 50 s for 5 steps has 50 s to
    go, not the 3 s the 90 earlier steps, counted as if done in those 50 s, would give."""
    import time

    from autoprune.progress import bar

    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    with bar("train", 100, enabled=True, completed=90) as b:
        clock[0] += 50.0
        b.advance(5)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == "train 95/100 elapsed 50s eta 50s", lines
