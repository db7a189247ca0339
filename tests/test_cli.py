"""`sparselora-fx inspect` / `demo`: the built-in model, a local HF folder built on the meta device, and
one clear line (exit status 2, no traceback) for every expected user mistake."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparselora_fx import cli
from sparselora_fx.cli import main


def test_inspect_builtin_prints_groups(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--layers", "3"]) == 0
    out = capsys.readouterr().out
    assert "21 LoRA units, 9 groups" in out
    assert "model.layers.1.mlp" in out and "gated_mlp" in out
    assert "dense" in out  # the default preset keeps the first and last layer dense


def _llama_folder(path: Path) -> Path:
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=320, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2)
    cfg.save_pretrained(path)
    return path


def test_inspect_local_folder_on_meta_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Only config.json is needed: no weights are read (an 8B folder needs no 32 GB)."""
    _llama_folder(tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    assert main(["inspect", "--model", str(tmp_path), "--sparsity", "0.5", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["units"]) == 21
    kinds = sorted(g["kind"] for g in data["groups"])
    assert kinds == ["attn_qk"] * 3 + ["attn_vo"] * 3 + ["gated_mlp"] * 3
    qk = next(g for g in data["groups"] if g["kind"] == "attn_qk")
    assert (qk["num_heads"], qk["num_kv_heads"], qk["head_dim"]) == (8, 2, 16)


# ------------------------------------------------------------------------ user mistakes


def _one_error_line(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """stderr is exactly one ``sparselora-fx...: error: ...`` line, holding every needle; stdout is empty."""
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sparselora-fx") and ": error: " in lines[0], err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert captured.out == ""
    return lines[0]


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Bad inputs of every shape the mistakes below need (and one good policy file)."""
    f = {"file": tmp_path / "a-file.txt", "missing": tmp_path / "missing", "empty": tmp_path / "empty-folder"}
    f["file"].write_text("x")
    f["empty"].mkdir()
    for name, text in {"broken": '{"model_type": ', "blank": "", "unknown": '{"model_type": "no-such-arch"}',
                       "no_type": '{"hidden_size": 8}', "list": "[1, 2]"}.items():
        folder = tmp_path / f"cfg-{name}"
        folder.mkdir()
        (folder / "config.json").write_text(text)
        f[name] = folder
    f["bad_toml"] = tmp_path / "bad.toml"
    f["bad_toml"].write_text("[[rules]\nmlp = 0.5\n")
    f["bad_rule"] = tmp_path / "bad-rule.toml"
    f["bad_rule"].write_text('[[rules]]\nlayers = "x"\nmlp = 0.5\n')
    f["good_toml"] = tmp_path / "good.toml"
    f["good_toml"].write_text("[defaults]\nmlp = 0.5\n")
    f["binary"] = tmp_path / "binary.bin"
    f["binary"].write_bytes(b"\x00\xff\xfe\x80" * 16)
    f["bad_json"] = tmp_path / "bad.json"
    f["bad_json"].write_text("[{")
    return f


def test_demo_cuda_without_cuda(no_cuda: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--device", "cuda"]) == 2
    _one_error_line(capsys, "--device cuda", "CUDA is not available", "use --device cpu")


def test_demo_cuda_index_past_the_devices(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["demo", "--device", "cuda:3"]) == 2
    _one_error_line(capsys, "--device cuda:3", "1 CUDA device(s)", "cuda:0")


@pytest.mark.parametrize("value", ["tpu", "gpu", "cuda:x", "cuda:\u00b2", "cpu:0", ""])
def test_demo_unknown_device(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--device", value]) == 2
    _one_error_line(capsys, "--device", repr(value), "use cpu or cuda")


def test_demo_out_is_an_existing_file(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(files["file"])]) == 2
    _one_error_line(capsys, f"--out {files['file']}", "existing file, not a folder", "pass a folder path")


def test_demo_out_under_a_file(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = files["file"] / "sub"
    assert main(["demo", "--out", str(out)]) == 2
    _one_error_line(capsys, f"--out {out}", "is a file", "pass a folder path")


def test_demo_out_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if cli._writable(locked):  # root writes through modes: make the check say what a user would see
            monkeypatch.setattr(cli, "_writable", lambda folder: False)
        assert main(["demo", "--out", str(locked / "run")]) == 2
        _one_error_line(capsys, f"--out {locked / 'run'}", f"folder {locked}", "not writable",
                        "a folder you can write to")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("cmd", ["inspect", "demo"])
@pytest.mark.parametrize("case,needles", [
    ("missing", ("no such folder", "save_pretrained", "drop --model")),
    ("empty", ("no config.json", "save_pretrained")),
    ("file", ("a file, not a folder", "save_pretrained")),
    ("broken", ("config.json is not valid JSON", "line 1, column 16", "re-save it")),
    ("blank", ("config.json is empty", "re-save it")),
    ("list", ("JSON list, not an object", "re-save it")),
    ("no_type", ('no "model_type"', "re-save it")),
    ("unknown", ("model_type 'no-such-arch'", "does not know", "supported model type")),
])
def test_bad_model_folder(cmd: str, case: str, needles: tuple[str, ...], files: dict[str, Path],
                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main([cmd, "--model", str(files[case])]) == 2
    _one_error_line(capsys, f"--model {files[case]}", *needles)


def test_inspect_config_transformers_rejects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "wide"}))
    assert main(["inspect", "--model", str(tmp_path)]) == 2
    _one_error_line(capsys, f"--model {tmp_path}", "transformers rejects its config.json", "hidden_size", "re-save")


def test_inspect_lora_targets_not_in_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _llama_folder(tmp_path)
    assert main(["inspect", "--model", str(tmp_path), "--lora-targets", "no_such_proj"]) == 2
    _one_error_line(capsys, "--lora-targets no_such_proj", "not found", "use all-linear")


@pytest.mark.parametrize("argv,needles", [
    (["inspect", "--layers", "0"], ("--layers: 0 is too small", ">= 1", "e.g. 4")),
    (["inspect", "--seq", "0"], ("--seq: 0 is too small", ">= 1")),
    (["inspect", "--batch", "-2"], ("--batch: -2 is too small", ">= 1")),
    (["inspect", "--lora-rank", "0"], ("--lora-rank: 0 is too small", ">= 1")),
    (["inspect", "--layers", "two"], ("--layers: 'two' is not a whole number", "e.g. 4")),
    (["inspect", "--arch", "gpt2", "--seq", "500"], ("--seq 500", "128 learned positions", "--seq 128 or less")),
    (["inspect", "--arch", "t5"], ("--arch: invalid choice: 't5'", "choose from")),
    (["demo", "--layers", "0"], ("--layers: 0 is too small", "e.g. 2")),
    (["demo", "--seq", "0"], ("--seq: 0 is too small", ">= 8")),
    (["demo", "--steps", "0"], ("--steps: 0 is too small", ">= 2", "compiles", "e.g. 30")),
    (["demo", "--steps", "-5"], ("--steps: -5 is too small", ">= 2")),
    (["demo", "--batch", "0"], ("--batch: 0 is too small", ">= 1")),
    (["demo", "--batch", "-1"], ("--batch: -1 is too small", ">= 1")),
    (["demo", "--steps", "2.5"], ("--steps: '2.5' is not a whole number",)),
    (["demo", "--inner", "jit"], ("--inner: invalid choice: 'jit'",)),
    (["demo", "--sparsity", "1"], ("--sparsity: 1 is outside [0, 1)", "fraction of channels dropped", "e.g. 0.5")),
    (["inspect", "--sparsity", "1.5"], ("--sparsity: 1.5 is outside [0, 1)",)),
    (["inspect", "--sparsity", "-0.1"], ("--sparsity: -0.1 is outside [0, 1)",)),
    (["inspect", "--sparsity", "nan"], ("--sparsity: nan is outside [0, 1)",)),
    (["demo", "--sparsity", "half"], ("--sparsity: 'half' is not a number", "e.g. 0.5")),
    (["demo", "--policy", ""], ("--policy: empty", "preset name", ".toml")),
    (["inspect", "--policy", "no-such-preset"], ("unknown policy preset 'no-such-preset'", "Available presets")),
    ([], ("required: {inspect,demo}",)),
    (["train"], ("invalid choice: 'train'",)),
    (["demo", "--frobnicate"], ("unrecognized arguments: --frobnicate",)),
    (["demo", "--steps"], ("--steps: expected one argument",)),
])
def test_bad_values(argv: list[str], needles: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    _one_error_line(capsys, *needles)


@pytest.mark.parametrize("cmd", ["inspect", "demo"])
def test_bad_policy_files(cmd: str, files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    missing = files["missing"].with_suffix(".toml")
    assert main([cmd, "--policy", str(missing)]) == 2
    _one_error_line(capsys, str(missing), "policy file not found", "preset name")
    assert main([cmd, "--policy", str(files["bad_toml"])]) == 2
    _one_error_line(capsys, f"{files['bad_toml']}:1:", "malformed TOML")
    assert main([cmd, "--policy", str(files["empty"])]) == 2
    _one_error_line(capsys, str(files["empty"]), "unsupported policy file type", ".toml")


def test_policy_error_names_its_source_once(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """It once read ``bad-rule.toml: rules[0]: bad-rule.toml: rules[0]: layers entry 'x' ...``."""
    assert main(["inspect", "--policy", str(files["bad_rule"])]) == 2
    line = _one_error_line(capsys, "layers entry 'x'", 'layers = ["3-30"]')
    assert line.count("rules[0]") == 1 and line.count(str(files["bad_rule"])) == 1, line


@pytest.mark.parametrize("case,needles", [
    ("missing", ("data file not found", "--data")),
    ("empty", ("a folder, not a data file", "--data")),
    ("binary", ("not UTF-8 text", "--data")),
    ("bad_json", ("malformed JSON", "JSON list")),
])
def test_demo_bad_data(case: str, needles: tuple[str, ...], files: dict[str, Path],
                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--data", str(files[case])]) == 2
    _one_error_line(capsys, str(files[case]), *needles)


def test_demo_model_without_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _llama_folder(tmp_path / "model")
    assert main(["demo", "--model", str(model), "--out", str(tmp_path / "out"), "--no-plot"]) == 2
    _one_error_line(capsys, f"--model {model}", "no tokenizer", "tokenizer.save_pretrained")


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "inspect" in capsys.readouterr().out
    assert main(["demo", "-h"]) == 0
    assert "--device" in capsys.readouterr().out


def test_internal_errors_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug is not a user mistake: main() must not turn it into an error line."""
    def broken(args: object) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "cmd_inspect", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["inspect", "--layers", "1"])


def test_console_script_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    """The installed entry point, in a fresh process: one line on stderr, status 2, no traceback."""
    exe = Path(sys.executable).with_name("sparselora-fx")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "sparselora_fx.cli"]
    proc = subprocess.run([*cmd, "demo", "--steps", "0", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "sparselora-fx demo: error: argument --steps: 0 is too small: it must be >= 2 "
        "(the first step compiles and is not timed); e.g. 30."]


# ------------------------------------------------------------------------ fuzz

FUZZ_CASES = 200
_RAN = 99  # what a command patched out by the fuzz returns: validation let the arguments through


def _fuzz_pieces(files: dict[str, Path], model: Path, out: Path) -> dict[str, dict[str, tuple[list, list]]]:
    """Per subcommand, per option: (valid values, invalid values); a value is a list of argv words."""
    s = str
    policy = ([["--policy", "default"], ["--policy", "dense"], ["--policy", s(files["good_toml"])]],
              [["--policy", s(files["missing"]) + ".toml"], ["--policy", s(files["bad_toml"])],
               ["--policy", s(files["bad_rule"])], ["--policy", "no-such-preset"], ["--policy", ""]])
    sparsity = ([["--sparsity", v] for v in ("0", "0.5", "0.99")],
                [["--sparsity", v] for v in ("1", "-0.5", "2", "nan", "inf", "x", "")])
    bad_models = [["--model", s(files[k])] for k in ("missing", "empty", "file", "broken", "blank", "unknown",
                                                     "no_type", "list")]
    ints = lambda flag, good, bad: ([[flag, v] for v in good], [[flag, v] for v in bad])  # noqa: E731
    common_bad = [["--frobnicate"], ["--seq"], ["--batch", "--json"]]
    inspect = {
        "model": ([["--model", s(model)]], bad_models),
        "arch": ([["--arch", a] for a in ("llama", "gpt2", "bert")], [["--arch", "t5"], ["--arch", ""]]),
        "layers": ints("--layers", ("1", "3"), ("0", "-1", "x", "1.5")),
        "lora_rank": ints("--lora-rank", ("4", "8"), ("0", "-8", "r8")),
        "batch": ints("--batch", ("1", "2"), ("0", "-3", "")),
        "seq": ints("--seq", ("8", "64"), ("0", "-16", "long")),
        "policy": policy, "sparsity": sparsity,
        "json": ([["--json"]], [["--json", "yes"]]),
        "junk": ([], common_bad),
    }
    demo = {
        "model": ([["--model", s(model)]], bad_models),
        "data": ([], [["--data", s(files[k])] for k in ("missing", "empty", "binary", "bad_json")]),
        "steps": ints("--steps", ("2", "30"), ("1", "0", "-4", "many")),
        "batch": ints("--batch", ("1", "8"), ("0", "-1", "1e3")),
        "seq": ints("--seq", ("8", "128"), ("7", "0", "-128")),
        "layers": ints("--layers", ("1", "4"), ("0", "-2")),
        "device": ([["--device", "cpu"], ["--device", "CPU"]],
                   [["--device", d] for d in ("cuda", "cuda:0", "tpu", "gpu", "cuda:", "")]),
        "inner": ([["--inner", i] for i in ("inductor", "eager")], [["--inner", "jit"]]),
        "out": ([["--out", s(out)]], [["--out", s(files["file"])], ["--out", s(files["file"] / "sub")]]),
        "seed": ([["--seed", "0"], ["--seed", "-1"]], [["--seed", "zero"]]),
        "policy": policy, "sparsity": sparsity,
        "junk": ([], common_bad),
    }
    return {"inspect": inspect, "demo": demo}


def _fuzz_case(rng: random.Random, pieces: dict[str, dict[str, tuple[list, list]]]) -> tuple[list[str], bool]:
    """One argv and whether it holds a mistake: a few options (each at most once), some invalid."""
    if rng.random() < 0.03:
        return [rng.choice(["train", "", "--json", "fidelity"])], True
    cmd = rng.choice(sorted(pieces))
    options = pieces[cmd]
    chosen = rng.sample(sorted(options), rng.randint(1, 5))
    words: list[list[str]] = []
    invalid = False
    for name in chosen:
        good, bad = options[name]
        if bad and (not good or rng.random() < 0.4):
            words.append(rng.choice(bad))
            invalid = True
        else:
            words.append(rng.choice(good))
    # interactions: the built-in gpt2 holds 128 positions (checked only without --model)
    flat = [w for piece in words for w in piece]
    if cmd == "inspect" and "--model" not in flat and rng.random() < 0.1:
        words = [p for p in words if p[0] not in ("--arch", "--seq")] + [["--arch", "gpt2", "--seq", "200"]]
        invalid = True
    rng.shuffle(words)
    return [cmd] + [w for piece in words for w in piece], invalid


def test_fuzz_cli_never_raises(tmp_path: Path, files: dict[str, Path], no_cuda: None,
                               monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Seeded fuzz, random.Random(0), FUZZ_CASES argument lists drawn from valid and invalid pieces.

    No model is built: the commands are patched to return a marker, so a case ends in parsing or
    validation. Each case with a mistake must give status 2 and one error line (no traceback); each
    case without one must reach its command (validation must not reject valid arguments).
    """
    monkeypatch.setattr(cli, "cmd_inspect", lambda args: _RAN)
    monkeypatch.setattr(cli, "cmd_demo", lambda args: _RAN)
    pieces = _fuzz_pieces(files, _llama_folder(tmp_path / "model"), tmp_path / "out")
    rng = random.Random(0)
    outcomes = {"error": 0, "ran": 0}
    for i in range(FUZZ_CASES):
        argv, invalid = _fuzz_case(rng, pieces)
        rc = main(argv)  # anything but a SparseLoRAError or argparse's exit propagates and fails the test
        captured = capsys.readouterr()
        if invalid:
            assert rc == 2, (i, argv, rc)
            lines = captured.err.strip().splitlines()
            assert len(lines) == 1 and ": error: " in lines[0] and "Traceback" not in captured.err, (i, argv, lines)
            outcomes["error"] += 1
        else:
            assert rc == _RAN and captured.err == "", (i, argv, rc, captured.err)
            outcomes["ran"] += 1
    assert not (tmp_path / "out").exists()  # validation creates nothing
    assert outcomes["error"] > FUZZ_CASES // 2 and outcomes["ran"] > 10, outcomes
    print("fuzz outcomes", outcomes)
