"""Label spaces other than ImageNet-1k: a class-names file (one name a line, line i = the model's class i) and ground
truth from a CSV of `image,class`, where class is a name from that file or a class index."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from int8eval.errors import DatasetError

HEADER = ["image", "class"]


def read_class_names(path: Path) -> list[str]:
    """The class names of FILE in order (line i: class i); blank lines at the end are ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeError) as e:
        raise DatasetError(f"cannot read class names {path}: {type(e).__name__}: {e}") from None
    names = [line.strip() for line in text.rstrip("\n").splitlines()]
    for i, name in enumerate(names, 1):
        if not name:
            raise DatasetError(f"{path}, line {i}: an empty class name (line i names the model's class i - 1)")
    seen: dict[str, int] = {}
    for i, name in enumerate(names, 1):
        if name in seen:
            raise DatasetError(f"{path}, lines {seen[name]} and {i}: the class name {name!r} twice")
        seen[name] = i
    if not names:
        raise DatasetError(f"class names {path} is empty")
    return names


def is_class_csv(path: Path) -> bool:
    """Whether `path` is a CSV whose header is `image,class`."""
    path = Path(path)
    if path.suffix.lower() != ".csv" or not path.is_file():
        return False
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        return [h.strip().lower() for h in f.readline().split(",")] == HEADER


def read_class_csv(path: Path, class_names: list[str] | None, num_classes: int | None) -> dict[str, int]:
    """image (a path relative to the data folder) -> class index. A class is a name of `class_names` or an index
    below `num_classes`; any other value, a short line or an image listed twice with two classes is a DatasetError
    naming the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeError) as e:
        raise DatasetError(f"cannot read labels {path}: {type(e).__name__}: {e}") from None
    index = {name: i for i, name in enumerate(class_names or [])}
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    next(reader, None)  # the header
    out: dict[str, int] = {}
    line_of: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DatasetError(f"{path}, line {line}: expected `image,class`, got {','.join(row)!r}")
        image, value = row[0].strip(), row[1].strip()
        if value in index:
            label = index[value]
        elif value.isdigit() and (num_classes is None or int(value) < num_classes):
            label = int(value)
        else:
            known = f"a name in the class-names file ({', '.join(list(index)[:5])}, ...)" if index else "a class index"
            raise DatasetError(f"{path}, line {line}: class {value!r} is not {known}"
                               + (f" below {num_classes}" if num_classes and not index else ""))
        if image in out and out[image] != label:
            raise DatasetError(f"{path}, lines {line_of[image]} and {line}: {image} is listed with two classes")
        out[image], line_of[image] = label, line
    if not out:
        raise DatasetError(f"labels {path} lists no images")
    return out
