"""Convert Pascal VOC XML annotations to object-detection JSONL (data.md); the output is described in
`models.data.convert`."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image

from models.data.convert import (
    ConvertSummary, Json, Size, box_keys, clip_box, crowd_flag, finite_number, jsonl_line, relative_url, write_jsonl,
)
from models.data.formats import IMAGE_EXTENSIONS


def _voc_files(voc_dir: Path, annotations_subdir: str, images_subdir: str) -> tuple[list[Path], Path]:
    """The XML files and the folder holding the images (VOC layout, or xml files next to images)."""
    if not voc_dir.is_dir():
        raise ValueError(f"{voc_dir}: not a folder")
    ann_dir = voc_dir / annotations_subdir
    if ann_dir.is_dir():
        img_dir = voc_dir / images_subdir if (voc_dir / images_subdir).is_dir() else voc_dir
        xmls = sorted(ann_dir.glob("*.xml"))
    else:
        img_dir, xmls = voc_dir, sorted(voc_dir.glob("*.xml"))
    if not xmls:
        raise ValueError(f"{voc_dir}: no .xml files found (looked in {annotations_subdir}/ and the folder itself)")
    return xmls, img_dir


def _parse_xml(xml_path: Path) -> ET.Element:
    """Parse a VOC XML file, naming it in the error."""
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as e:
        raise ValueError(f"{xml_path.name}: cannot parse XML: {e}") from e
    if root.tag != "annotation":
        raise ValueError(f"{xml_path.name}: root element is <{root.tag}>, expected <annotation>")
    return root


def _xml_text(node: ET.Element, tag: str, where: str, required: bool = True) -> str | None:
    """Stripped text of a child element, or ValueError naming `where` and the field."""
    child = node.find(tag)
    text = child.text.strip() if child is not None and child.text else None
    if required and not text:
        raise ValueError(f"{where}: missing <{tag}>")
    return text


def _xml_float(node: ET.Element, tag: str, where: str) -> float:
    """A numeric child element."""
    text = _xml_text(node, tag, where)
    try:
        return finite_number(float(text or ""), f"{where}: <{tag}>")
    except ValueError:
        raise ValueError(f"{where}: <{tag}> is {text!r}, expected a number") from None


def _voc_image_path(root: ET.Element, xml_path: Path, img_dir: Path) -> Path:
    """The image of an annotation: <filename> in the images folder, else a file with the xml's stem."""
    name = _xml_text(root, "filename", xml_path.name, required=False)
    if name and ((img_dir / name).is_file() or Path(name).suffix):
        return img_dir / name
    for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
        if (img_dir / f"{xml_path.stem}{ext}").is_file():
            return img_dir / f"{xml_path.stem}{ext}"
    if name:
        return img_dir / name
    raise ValueError(f"{xml_path.name}: no <filename> and no image named {xml_path.stem}.* in {img_dir}")


def _voc_size(root: ET.Element, xml_path: Path, image: Path) -> Size:
    """(width, height) from <size>, else from the image file."""
    size = root.find("size")
    if size is not None:
        texts = [_xml_text(size, t, f"{xml_path.name}: <size>", required=False) for t in ("width", "height")]
        try:
            width, height = (int(float(t or 0)) for t in texts)
        except ValueError:
            raise ValueError(f"{xml_path.name}: <size> width/height {texts} are not numbers") from None
        if width > 0 and height > 0:
            return width, height
    if not image.is_file():
        raise ValueError(f"{xml_path.name}: no usable <size> and image {image.name} not found")
    with Image.open(image) as im:
        return im.size


def _voc_object(obj: ET.Element, size: Size, where: str, summary: ConvertSummary) -> Json | None:
    """One detection object; VOC 1-based inclusive pixels [xmin, xmax] cover [xmin - 1, xmax]."""
    name = _xml_text(obj, "name", where)
    bnd = obj.find("bndbox")
    if bnd is None:
        raise ValueError(f"{where}: missing <bndbox>")
    xmin, ymin, xmax, ymax = (_xml_float(bnd, t, f"{where}: <bndbox>") for t in ("xmin", "ymin", "xmax", "ymax"))
    if xmax < xmin or ymax < ymin:
        raise ValueError(f"{where}: <bndbox> has xmax < xmin or ymax < ymin ({xmin}, {ymin}, {xmax}, {ymax})")
    box = clip_box([(xmin - 1) / size[0], (ymin - 1) / size[1], xmax / size[0], ymax / size[1]], where, summary)
    if box is None:
        return None
    crowd = crowd_flag(_xml_text(obj, "difficult", where, required=False) or 0, where)
    return {"label": name, **box_keys(box), "isCrowd": crowd}


def voc_to_jsonl(
    voc_dir: str | Path,
    out_jsonl: str | Path,
    *,
    annotations_subdir: str = "Annotations",
    images_subdir: str = "JPEGImages",
) -> ConvertSummary:
    """Convert Pascal VOC XML files (sorted by name) to object-detection JSONL.

    Layout: ``voc_dir/Annotations/*.xml`` with images in ``voc_dir/JPEGImages`` (or `voc_dir`), or
    xml files next to the images. The image is ``<filename>`` in the images folder, else the file
    with the xml's stem. VOC boxes are 1-based inclusive pixel indices, so
    ``topX = (xmin - 1) / width`` and ``bottomX = xmax / width``. ``<difficult>1`` becomes
    ``isCrowd: 1`` (ignored by metrics). Size comes from ``<size>``, else from the image.
    """
    root_dir, out = Path(voc_dir), Path(out_jsonl)
    xmls, img_dir = _voc_files(root_dir, annotations_subdir, images_subdir)
    summary = ConvertSummary(out_jsonl=out, bbox_format_used="pixel")
    used: set[str] = set()
    missing: list[str] = []
    lines = []
    for xml_path in xmls:
        root = _parse_xml(xml_path)
        image = _voc_image_path(root, xml_path, img_dir)
        if not image.is_file():
            missing.append(image.name)
        size = _voc_size(root, xml_path, image)
        found = enumerate(root.findall("object"))
        objects = [_voc_object(o, size, f"{xml_path.name}: object {k}", summary) for k, o in found]
        label = [o for o in objects if o is not None]
        summary.n_annotations += len(label)
        used.update(o["label"] for o in label)
        lines.append(jsonl_line(relative_url(image, out), image.name, size, label))
    summary.warn_missing(root_dir.name, missing)
    return write_jsonl(out, lines, summary, used)
