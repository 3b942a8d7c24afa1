"""The CLI: help, version, --config, and every error path (exit 2, one line, no traceback)."""

from __future__ import annotations

import json
import os

import pytest

import schemas
from tests.conftest import run_cli, run_subprocess


def test_help_lists_commands_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(["--help"], capsys)
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("extract", "cache", "demo"):
        assert cmd in out
    with pytest.raises(SystemExit):
        run_cli(["--version"], capsys)
    assert "stage1-pro 0." in capsys.readouterr().out


def _extract_args(digits, spec, out, *extra):
    return ["extract", "--images", digits["root"], "--labels", digits["val"], "--backbone", spec,
            "--out", str(out), "--workers", "0", "--quiet", *extra]


def test_extract_info_verify_merge(digits_small, tiny_hf, tmp_path, capsys):
    out = tmp_path / "c"
    code, stdout, err = run_cli(_extract_args(digits_small, tiny_hf, out, "--shard-size", "4"), capsys)
    assert code == 0, err
    assert "extracted" in stdout and "failures: 0" in stdout
    saved = schemas.read_json(str(out / "extract.json"), "extract_config")
    assert saved["config"]["shard_size"] == 4 and saved["config"]["backbone"] == tiny_hf
    code, stdout, _ = run_cli(["cache", "info", str(out), "--json"], capsys)
    info = json.loads(stdout)
    schemas.validate(info, "cache_info", where="test")
    assert code == 0 and info["complete"] and info["feature_sets"] == {"cls": 64, "patch_mean": 64}
    code, stdout, _ = run_cli(["cache", "info", str(out)], capsys)
    assert "fingerprint" in stdout and "rows" in stdout
    assert run_cli(["cache", "verify", str(out)], capsys)[0] == 0
    code, stdout, _ = run_cli(["cache", "merge", str(out), "--out", str(tmp_path / "m.h5")], capsys)
    assert code == 0 and "merged" in stdout
    os.remove(next(out.glob("shard-00001.h5")))
    code, stdout, _ = run_cli(["cache", "verify", str(out)], capsys)
    assert code == 1 and "missing input ranges 4..7" in stdout


def test_config_file_supplies_options(digits_small, tiny_hf, tmp_path, capsys):
    cfg = tmp_path / "extract.toml"
    cfg.write_text(f'images = ["{digits_small["root"]}"]\nlabels = ["{digits_small["val"]}"]\n'
                   f'backbone = "{tiny_hf}"\nout = "{tmp_path / "c"}"\nbatch-size = 5\nworkers = 0\nquiet = true\n')
    code, _, err = run_cli(["extract", "--config", str(cfg), "--shard-size", "7"], capsys)
    assert code == 0, err
    saved = schemas.read_json(str(tmp_path / "c" / "extract.json"), "extract_config")
    assert saved["config"]["batch_size"] == 5 and saved["config"]["shard_size"] == 7
    # the saved resolved config can be fed back as a config file: same run, nothing to redo
    code, stdout, err = run_cli(["extract", "--config", str(tmp_path / "c" / "extract.json"), "--quiet"], capsys)
    assert code == 0, err
    assert "0 shard(s) written" in stdout


def _bad_cases(tmp_path, digits, spec):
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("images/x.jpg,0\nimages/y.jpg,maybe\n")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"nope")
    bad_json = tmp_path / "c.json"
    bad_json.write_text("{bad")
    unknown_key = tmp_path / "k.json"
    unknown_key.write_text('{"backbone": "hf:x", "colour": "red"}')
    ok = ["--images", digits["root"], "--labels", digits["val"], "--out", str(tmp_path / "o")]
    return [
        (["extract", "--backbone", spec], "extract needs --images, --out"),
        (["extract", "--images", str(tmp_path / "nope"), "--backbone", spec, "--out", str(tmp_path / "o")],
         "nope: --images must be an existing directory"),
        (["extract", "--images", digits["root"], "--labels", str(bad_csv), "--backbone", spec, "--out",
          str(tmp_path / "o")], r"bad.csv:2: label 'maybe' is not an integer"),
        (["extract", *ok, "--backbone", "dinov3"], "unknown backbone spec 'dinov3'"),
        (["extract", *ok, "--backbone", "hf:" + str(tmp_path / "missing-model")], "cannot load a transformers config"),
        (["extract", *ok[:-1], str(a_file), "--backbone", spec], "--out must be a directory"),
        (["extract", *ok, "--backbone", spec, "--max-failures", "lots"], "--max-failures 'lots'"),
        (["extract", *ok, "--backbone", spec, "--device", "cuda:7"] if not _has_cuda() else
         ["extract", *ok, "--backbone", spec, "--device", "nonsense"], "--device"),
        (["cache", "info", str(tmp_path / "absent")], "no such cache file or directory"),
        (["cache", "info", str(junk)], "cannot be read as HDF5"),
        (["cache", "merge", str(junk), "--out", str(tmp_path / "m.h5")], "cannot be read as HDF5"),
        (["extract", "--config", str(tmp_path / "none.json")], "config file not found"),
        (["extract", "--config", str(bad_json)], "invalid JSON at line 1"),
        (["extract", "--config", str(unknown_key)], "unknown key 'colour'"),
    ]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_every_error_path_is_one_line_exit_2(digits_small, tiny_hf, tmp_path, capsys):
    for argv, match in _bad_cases(tmp_path, digits_small, tiny_hf):
        code, _, err = run_cli(argv, capsys)
        assert code == 2, (argv, err)
        assert match in err, (argv, err)
        assert err.count("\n") == 1 and err.startswith("stage1: error: ") and "Traceback" not in err


def test_mismatched_cache_refused_nothing_lost(digits_small, tiny_hf, tiny_timm, tmp_path, capsys):
    out = tmp_path / "c"
    assert run_cli(_extract_args(digits_small, tiny_hf, out), capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = run_cli(_extract_args(digits_small, tiny_timm, out), capsys)
    assert code == 2 and "already holds a cache built with backbone" in err
    assert before == {p.name: p.read_bytes() for p in out.iterdir()}
    other = tmp_path / "t"
    assert run_cli(_extract_args(digits_small, tiny_timm, other), capsys)[0] == 0
    code, _, err = run_cli(["cache", "merge", str(out), str(other), "--out", str(tmp_path / "m.h5")], capsys)
    assert code == 2 and "caches do not match" in err and str(other) in err


def test_real_process_exit_status_and_no_traceback(tmp_path):
    r = run_subprocess(["cache", "info", str(tmp_path / "absent")])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"stage1: error: {tmp_path / 'absent'}: no such cache file or directory; check the path"
    r = run_subprocess(["extract", "--bogus-flag"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
