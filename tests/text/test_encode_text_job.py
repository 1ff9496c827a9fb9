"""jobs/encode_text.py: summary table on success, one-line error on missing tables."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from textfeat_helpers import spec_dict, write_text_table

ROOT = Path(__file__).resolve().parents[2]


def _job():
    spec = importlib.util.spec_from_file_location("encode_text_job", ROOT / "jobs" / "encode_text.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_job_prints_summary_and_reuses_cache(tmp_path, tiny_bert, capsys):
    write_text_table(tmp_path / "prepared", "items", ["a", "b"], ["red pla filament", "racing video game"])
    write_text_table(tmp_path / "prepared", "queries", ["q"], ["lab gloves"])
    spec_path = tmp_path / "feature_specs" / "t.yaml"
    spec_path.parent.mkdir()
    spec_path.write_text(yaml.safe_dump(spec_dict(tmp_path, str(tiny_bert))))
    job = _job()
    assert job.main(["--spec", str(spec_path), "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["table", "texts", "new", "cached", "encoded", "seconds",
                                 "texts/s"]
    assert out[2].split()[:4] == ["items", "2", "2", "0"] and out[3].split()[:4] == ["queries", "1", "1", "0"]
    assert job.main(["--spec", str(spec_path), "--no-progress", "--set", "text.encoder.batch_size=2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2].split()[:4] == ["items", "2", "0", "2"]


def test_job_missing_table_is_one_line_error(tmp_path, tiny_bert, capsys, monkeypatch):
    spec_path = tmp_path / "t.yaml"
    spec_path.write_text(yaml.safe_dump(spec_dict(tmp_path, str(tiny_bert))))
    monkeypatch.delenv("RECSYS_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["encode_text.py", "--spec", str(spec_path)])
    job = _job()
    with pytest.raises(SystemExit) as exc:
        job.run_main(job.main)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: text table 'items' not found") and "prepare_data" in err[0]
