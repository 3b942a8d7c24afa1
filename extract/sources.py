"""Input lists: which images to embed, with labels, source and group keys.

A *source* is one ``--images DIR`` with an optional ``--labels`` spec:

* a CSV file of ``path,label[,group]`` lines (the users' layout; a header row is
  detected and skipped; paths relative to DIR or absolute),
* a JSON file: a list of ``{"path": ..., "label": ..., "group": ...}`` objects or a
  ``{path: label}`` mapping,
* the word ``folders``: an ImageFolder layout, one sub-folder per class,
* nothing (or ``none``): every image under DIR, unlabelled (label -1).

Missing or undecodable image files are not errors here: extraction records them as
failures. Malformed label rows are errors naming the file and line.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from cache.errors import Stage1Error
from cache.format import canonical_json

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
UNLABELLED = -1


@dataclass(frozen=True)
class Item:
    file: str  # path to open
    path: str  # path stored in the cache: relative to the source root when under it
    label: int  # class index, -1 = unlabelled
    source: str  # name of the source the item came from
    group: str  # explicit group key, or "" to group by the image's content hash


@dataclass(frozen=True)
class InputList:
    items: list[Item]
    classes: list[str] | None  # class names when a source defines them (ImageFolder)

    @property
    def plan_id(self) -> str:
        """Identity of the ordered input list: the same inputs give the same id."""
        h = hashlib.sha256()
        for it in self.items:
            h.update(canonical_json([it.path, it.label, it.source, it.group]).encode())
            h.update(b"\n")
        return h.hexdigest()


def _parse_label(value: str, where: str) -> int:
    v = value.strip()
    try:
        lab = int(v)
    except ValueError:
        try:
            f = float(v)
        except ValueError:
            f = None
        if f is None or f != int(f):
            raise Stage1Error(f"{where}: label {value!r} is not an integer class index; "
                              "labels must be 0, 1, ... (0 = no roadwork, 1 = roadwork)") from None
        lab = int(f)
    if lab < 0:
        raise Stage1Error(f"{where}: label {lab} is negative; labels must be 0, 1, ...")
    return lab


def _resolve(root: str, p: str) -> tuple[str, str]:
    """(file to open, path to store) for a listed path."""
    p = p.strip()
    if os.path.isabs(p):
        try:
            rel = os.path.relpath(p, root)
        except ValueError:  # other drive
            rel = p
        return p, (rel if not rel.startswith("..") else p)
    return os.path.join(root, p), os.path.normpath(p)


def _is_int(s: str) -> bool:
    try:
        int(s.strip())
    except ValueError:
        return False
    return True


def read_csv_labels(root: str, csv_path: str, source: str) -> list[Item]:
    """Users' CSV: ``path,label[,group]``; a first row whose label is not a number is a header."""
    items: list[Item] = []
    try:
        fh = open(csv_path, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise Stage1Error(f"{csv_path}: cannot read labels file ({e.strerror}); check the --labels path") from None
    with fh:
        first_data_seen = False
        for lineno, row in enumerate(csv.reader(fh), start=1):
            if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
                continue
            where = f"{csv_path}:{lineno}"
            if len(row) < 2 or len(row) > 3:
                raise Stage1Error(f"{where}: expected 'path,label' or 'path,label,group', got {len(row)} "
                                  f"field(s): {','.join(row)!r}")
            if not first_data_seen:
                first_data_seen = True
                if not _is_int(row[1]):
                    try:
                        _parse_label(row[1], where)
                    except Stage1Error:
                        continue  # header row, e.g. "path,label"
            if not row[0].strip():
                raise Stage1Error(f"{where}: empty image path")
            file, stored = _resolve(root, row[0])
            group = row[2].strip() if len(row) == 3 else ""
            items.append(Item(file, stored, _parse_label(row[1], where), source, group))
    if not items:
        raise Stage1Error(f"{csv_path}: no label rows; expected lines 'relative/path.jpg,label'")
    return items


def read_json_labels(root: str, json_path: str, source: str) -> list[Item]:
    """JSON list of ``{"path", "label"[, "group"]}`` objects, or a ``{path: label}`` mapping."""
    try:
        with open(json_path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as e:
        raise Stage1Error(f"{json_path}: cannot read labels file ({e.strerror}); check the --labels path") from None
    except json.JSONDecodeError as e:
        raise Stage1Error(f"{json_path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    items: list[Item] = []
    if isinstance(data, dict):
        for k, v in data.items():
            file, stored = _resolve(root, k)
            items.append(Item(file, stored, _parse_label(str(v), f"{json_path}: key {k!r}"), source, ""))
    elif isinstance(data, list):
        for i, rec in enumerate(data):
            where = f"{json_path}: item {i}"
            if not isinstance(rec, dict) or "path" not in rec or "label" not in rec:
                raise Stage1Error(f"{where}: expected an object with 'path' and 'label', got {rec!r:.80}")
            file, stored = _resolve(root, str(rec["path"]))
            items.append(Item(file, stored, _parse_label(str(rec["label"]), where), source,
                              str(rec.get("group", ""))))
    else:
        raise Stage1Error(f"{json_path}: expected a list of objects or a {{path: label}} mapping, "
                          f"got {type(data).__name__}")
    if not items:
        raise Stage1Error(f"{json_path}: no labelled images listed")
    return items


def _walk_images(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            if fn.lower().endswith(IMAGE_EXTENSIONS) and not fn.startswith("."):
                out.append(os.path.join(dirpath, fn))
    return out


def read_image_folder(root: str, source: str) -> tuple[list[Item], list[str]]:
    """ImageFolder layout: ``root/<class>/**/image``; classes in sorted order."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise Stage1Error(f"{root}: --labels folders needs one sub-folder per class; found none")
    if all(c.isdigit() for c in classes):
        classes = sorted(classes, key=int)
    items = []
    for ci, c in enumerate(classes):
        for f in _walk_images(os.path.join(root, c)):
            items.append(Item(f, os.path.relpath(f, root), ci, source, ""))
    if not items:
        raise Stage1Error(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) under the class folders")
    return items, classes


def read_bare_folder(root: str, source: str) -> list[Item]:
    items = [Item(f, os.path.relpath(f, root), UNLABELLED, source, "") for f in _walk_images(root)]
    if not items:
        raise Stage1Error(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    return items


def build_input_list(images: Sequence[str], labels: Sequence[str | None] | None = None) -> InputList:
    """Combine sources in order. ``labels[k]`` belongs to ``images[k]`` (None = unlabelled).

    Each source is named after its images directory (made unique with ``#k``).
    """
    labels = list(labels or [])
    if len(labels) > len(images):
        raise Stage1Error(f"{len(labels)} --labels given for {len(images)} --images; "
                          "give one --labels per --images, in the same order (use 'none' for unlabelled)")
    labels += [None] * (len(images) - len(labels))
    items: list[Item] = []
    classes: list[str] | None = None
    names: set[str] = set()
    for k, (root, lab) in enumerate(zip(images, labels, strict=True)):
        if not os.path.isdir(root):
            raise Stage1Error(f"{root}: --images must be an existing directory")
        name = os.path.basename(os.path.normpath(os.path.abspath(root))) or f"source{k}"
        if name in names:
            name = f"{name}#{k}"
        names.add(name)
        if lab is None or lab == "none":
            items += read_bare_folder(root, name)
        elif lab == "folders":
            got, cls = read_image_folder(root, name)
            if classes is not None and cls != classes:
                raise Stage1Error(f"{root}: class folders {cls} differ from an earlier source's {classes}; "
                                  "use the same class folder names in every source")
            classes = cls
            items += got
        elif lab.lower().endswith(".json"):
            items += read_json_labels(root, lab, name)
        elif os.path.isdir(lab):
            raise Stage1Error(f"{lab}: --labels is a directory; give a CSV/JSON file, 'folders' or 'none'")
        else:
            items += read_csv_labels(root, lab, name)
    return InputList(items, classes)
