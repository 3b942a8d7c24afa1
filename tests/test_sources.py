"""Label sources: the users' CSV (with/without header), JSON, ImageFolder, bare folders."""

from __future__ import annotations

import json
import os

import pytest

from cache import Stage1Error
from extract.sources import build_input_list


@pytest.fixture
def root(tmp_path):
    for rel in ("a.jpg", "b.jpg", "sub/c.png", "notes.txt"):
        p = tmp_path / "imgs" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    return str(tmp_path / "imgs")


def _csv(tmp_path, text, name="labels.csv"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_csv_without_header(root, tmp_path):
    il = build_input_list([root], [_csv(tmp_path, "a.jpg,0\nb.jpg,1\nsub/c.png,1\n")])
    assert [(i.path, i.label) for i in il.items] == [("a.jpg", 0), ("b.jpg", 1), ("sub/c.png", 1)]
    assert il.items[0].file == os.path.join(root, "a.jpg")
    assert {i.source for i in il.items} == {"imgs"}


@pytest.mark.parametrize("header", ["path,label", "image,target", "filename , class"])
def test_csv_header_detected(root, tmp_path, header):
    il = build_input_list([root], [_csv(tmp_path, f"{header}\na.jpg,0\nb.jpg,1\n")])
    assert [i.label for i in il.items] == [0, 1]


def test_csv_absolute_paths_and_group_column(root, tmp_path):
    text = f"{os.path.join(root, 'a.jpg')},1,scene7\n/elsewhere/z.jpg,0\n"
    il = build_input_list([root], [_csv(tmp_path, text)])
    assert il.items[0].path == "a.jpg" and il.items[0].group == "scene7"
    assert il.items[1].path == "/elsewhere/z.jpg" and il.items[1].file == "/elsewhere/z.jpg"


@pytest.mark.parametrize("text,match", [
    ("a.jpg,0\nb.jpg,yes\n", r"labels.csv:2: label 'yes' is not an integer"),
    ("a.jpg,0\nb.jpg\n", r"labels.csv:2: expected 'path,label'"),
    ("a.jpg,0\nb.jpg,-3\n", r"labels.csv:2: label -3 is negative"),
    ("a.jpg,0\n,1\n", r"labels.csv:2: empty image path"),
    ("\n\n", r"labels.csv: no label rows"),
    ("a.jpg,0\nb.jpg,1,g,extra\n", r"labels.csv:2: expected"),
])
def test_csv_malformed_rows_name_file_and_line(root, tmp_path, text, match):
    with pytest.raises(Stage1Error, match=match):
        build_input_list([root], [_csv(tmp_path, text)])


def test_json_list_and_mapping(root, tmp_path):
    p = tmp_path / "l.json"
    p.write_text(json.dumps([{"path": "a.jpg", "label": 1, "group": "g"}, {"path": "b.jpg", "label": 0}]))
    il = build_input_list([root], [str(p)])
    assert [(i.path, i.label, i.group) for i in il.items] == [("a.jpg", 1, "g"), ("b.jpg", 0, "")]
    p.write_text(json.dumps({"a.jpg": 0, "sub/c.png": 1}))
    assert [i.label for i in build_input_list([root], [str(p)]).items] == [0, 1]
    p.write_text("[{\"path\": \"a.jpg\"}]")
    with pytest.raises(Stage1Error, match=r"l.json: item 0: expected an object with 'path' and 'label'"):
        build_input_list([root], [str(p)])
    p.write_text("{not json")
    with pytest.raises(Stage1Error, match=r"l.json: invalid JSON at line 1"):
        build_input_list([root], [str(p)])


def test_image_folder_and_bare_folder(tmp_path):
    for rel in ("no_roadwork/x.jpg", "roadwork/y.jpg", "roadwork/deep/z.jpeg"):
        p = tmp_path / "f" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    il = build_input_list([str(tmp_path / "f")], ["folders"])
    assert il.classes == ["no_roadwork", "roadwork"]
    # torchvision ImageFolder order: a folder's own files before its sub-folders'.
    assert [(i.path, i.label) for i in il.items] == [("no_roadwork/x.jpg", 0), ("roadwork/y.jpg", 1),
                                                     ("roadwork/deep/z.jpeg", 1)]
    bare = build_input_list([str(tmp_path / "f")])
    assert all(i.label == -1 for i in bare.items) and len(bare.items) == 3


def test_sources_combine_in_order_and_plan_id(root, tmp_path):
    csv = _csv(tmp_path, "a.jpg,0\n")
    il = build_input_list([root, root], [csv, "none"])
    assert [i.source for i in il.items] == ["imgs", "imgs#1", "imgs#1", "imgs#1"]
    assert il.plan_id == build_input_list([root, root], [csv, "none"]).plan_id
    assert il.plan_id != build_input_list([root], [csv]).plan_id


def test_source_errors(root, tmp_path):
    with pytest.raises(Stage1Error, match="must be an existing directory"):
        build_input_list([str(tmp_path / "missing")])
    with pytest.raises(Stage1Error, match="cannot read labels file"):
        build_input_list([root], [str(tmp_path / "nope.csv")])
    with pytest.raises(Stage1Error, match="2 --labels given for 1 --images"):
        build_input_list([root], ["none", "none"])
