"""The one atomic text writer: the old file or the new one, never half, no temporary left."""

import json

import pytest

from wsimil.atomic import write_json, write_text


def test_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out" / "doc.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2, "é": "ü"}, indent=1)
    assert json.loads(path.read_text()) == {"a": 2, "é": "ü"}
    write_text(tmp_path / "out" / "t.csv", "slide_id,error\nß,x\n")
    assert sorted(p.name for p in path.parent.iterdir()) == ["doc.json", "t.csv"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "doc.json"
    write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["doc.json"]
