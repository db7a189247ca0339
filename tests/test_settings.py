"""Option parsing: one list of keys (the Settings fields plus the input-only ones), checked values."""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from pathlib import Path
from typing import Any

import pytest

from sparselora_fx import OptionsError, Policy
from sparselora_fx.runtime.schedule import StepSchedule
from sparselora_fx.settings import INPUT_ONLY_OPTIONS, Settings, option_docs

REPO = Path(__file__).resolve().parents[1]


# ---- one owner for the option keys ------------------------------------------------------------


def test_option_keys_are_the_settings_fields_plus_the_input_only_keys() -> None:
    fields = [f.name for f in dataclasses.fields(Settings)]
    assert not set(fields) & set(INPUT_ONLY_OPTIONS)
    assert list(option_docs()) == fields + list(INPUT_ONLY_OPTIONS)
    assert set(INPUT_ONLY_OPTIONS) == {"sparsity", "num_layers"}
    for key, doc in option_docs().items():
        assert isinstance(doc, str) and len(doc) > 20, key


def _readme_option_keys() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n### Options\n", 1)[1].split("\n#", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M)


def test_readme_options_table_lists_exactly_the_option_keys() -> None:
    keys = _readme_option_keys()
    assert len(keys) == len(set(keys)), f"a key is listed twice: {keys}"
    assert set(keys) == set(option_docs()), (
        f"README '### Options' lacks {sorted(set(option_docs()) - set(keys))}, "
        f"lists unknown {sorted(set(keys) - set(option_docs()))}")


def test_unknown_option_error_lists_every_key_with_its_doc() -> None:
    with pytest.raises(OptionsError) as err:
        Settings.from_options({"progres": False})
    msg = str(err.value)
    assert "'progres'" in msg and "Did you mean 'progress'" in msg
    for key, doc in option_docs().items():
        assert f"  {key}: {doc}" in msg


def test_settings_fields_are_typed_not_any() -> None:
    hints = typing.get_type_hints(Settings)
    assert hints["policy"] is Policy
    assert hints["schedule"] == StepSchedule | None
    assert hints["layer"] == int | None
    assert Any not in hints.values()



# ---- boolean options: booleans only ----------------------------------------------------------


@pytest.mark.parametrize("key", ["sparse_eval", "progress"])
@pytest.mark.parametrize("bad", ["no", "False", "", 1, 0, None])
def test_boolean_options_refuse_anything_but_a_bool(key: str, bad: object) -> None:
    with pytest.raises(OptionsError) as err:
        Settings.from_options({key: bad})
    msg = str(err.value)
    assert f"options[{key!r}]" in msg and repr(bad) in msg and "True or False" in msg


@pytest.mark.parametrize("key", ["sparse_eval", "progress"])
def test_boolean_options_take_true_and_false(key: str) -> None:
    assert getattr(Settings.from_options({key: True}), key) is True
    assert getattr(Settings.from_options({key: False}), key) is False


def test_sparse_eval_no_string_does_not_turn_sparse_eval_on() -> None:
    """``bool("no")`` is True: the string must be refused, never read as a switch."""
    with pytest.raises(OptionsError, match="sparse_eval"):
        Settings.from_options({"sparse_eval": "no"})


# ---- dump_dir: checked when the options are parsed ----------------------------------------------


@pytest.mark.parametrize("bad", [5, 1.5, ["dumps"], b"dumps"])
def test_dump_dir_that_is_not_a_path_is_an_options_error(bad: object) -> None:
    with pytest.raises(OptionsError) as err:
        Settings.from_options({"dump_dir": bad})
    msg = str(err.value)
    assert "options['dump_dir']" in msg and repr(bad) in msg and "os.PathLike" in msg


def test_dump_dir_that_is_a_file_is_an_options_error(tmp_path: Path) -> None:
    file = tmp_path / "dumps"
    file.write_text("not a folder")
    with pytest.raises(OptionsError) as err:
        Settings.from_options({"dump_dir": str(file)})
    msg = str(err.value)
    assert "options['dump_dir']" in msg and "is a file, not a folder" in msg
    assert msg.count(str(file)) == 1  # named once, not again by an OSError's own text


def test_dump_dir_that_cannot_be_created_is_an_options_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    target = tmp_path / "file" / "dumps"  # a file in the way: no folder can be made there
    with pytest.raises(OptionsError) as err:
        Settings.from_options({"dump_dir": target})
    msg = str(err.value)
    assert "options['dump_dir']" in msg and "cannot be written" in msg and "Not a directory" in msg
    assert msg.count(str(target)) == 1
    assert "Errno" not in msg and err.value.__cause__ is None and err.value.__suppress_context__


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes to read-only folders")
def test_dump_dir_without_write_permission_is_an_options_error(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OptionsError, match="Permission denied"):
            Settings.from_options({"dump_dir": str(locked)})
    finally:
        locked.chmod(0o700)


def test_dump_dir_from_env_that_cannot_be_written_names_the_env(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SPARSELORA_DUMP_DIR", str(tmp_path / "file"))
    with pytest.raises(OptionsError) as err:
        Settings.from_options({})
    msg = str(err.value)
    assert "env SPARSELORA_DUMP_DIR" in msg and "options['dump_dir']" not in msg and "unset it" in msg


def test_dump_dir_is_created_when_options_are_parsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPARSELORA_DUMP_DIR", raising=False)
    target = tmp_path / "new" / "dumps"
    assert Settings.from_options({"dump_dir": str(target)}).dump_dir == target
    assert target.is_dir() and list(target.iterdir()) == []  # the write probe is gone
    assert Settings.from_options({}).dump_dir is None
    assert Settings.from_options({"dump_dir": None}).dump_dir is None


# ---- schedule: validated with every other option ---------------------------------------------


def test_schedule_of_the_wrong_type_is_refused_when_options_are_parsed() -> None:
    with pytest.raises(OptionsError, match="StepSchedule"):
        Settings.from_options({"schedule": 5})


def test_schedule_contradicting_the_policy_is_refused_when_options_are_parsed() -> None:
    with pytest.raises(OptionsError, match="warmup_steps=3"):
        Settings.from_options({"policy": Policy(mlp=0.5, warmup_steps=5), "schedule": StepSchedule(3)})


def test_warmup_policy_needs_a_schedule_only_where_it_is_required() -> None:
    warm = {"policy": Policy(mlp=0.5, warmup_steps=5)}
    assert Settings.from_options(warm).schedule is None  # explain, FLOP counting: no training
    with pytest.raises(OptionsError, match="schedule.attach"):
        Settings.from_options(warm, require_schedule=True)  # the backend
    s = StepSchedule(5)
    assert Settings.from_options({**warm, "schedule": s}, require_schedule=True).schedule is s
