"""Hostile and broken BackdoorBench records, built here from the record test_backdoorbench.py
writes: each is refused in one sentence by load_record, and by ``bdfast clean --backdoorbench``
with exit code 2 and nothing written; a hostile one, besides, opens no file outside the record's
folders (every path opened is recorded), and one with a path that leads out opens no image and
no data set file at all."""
from __future__ import annotations

import builtins
import copy
import io
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch

from bdfast.cli import main
from bdfast.interop import backdoorbench as bb
from bdfast.lab.models import preact_resnet18_backdoorbench
from test_backdoorbench import NAME, WIDTH, build_bench

Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return build_bench(tmp_path_factory.mktemp("BackdoorBench"))


class Case:
    """A record under ``tmp_path/BackdoorBench/record/NAME``, with ``tmp_path/outside`` beside
    its BackdoorBench folder, holding copies of the record's files and images; were the reader
    to follow a path out there, it would read something valid."""

    def __init__(self, bench, tmp_path):
        self.bb_root = tmp_path / "BackdoorBench"
        shutil.copytree(bench["root"] / "record", self.bb_root / "record", symlinks=True)
        self.record = self.bb_root / "record" / NAME
        self.content = copy.deepcopy(bench["content"])
        self.entries = self.content["bd_test"]["bd_data_container"]["data_dict"]
        self.sample, entry = next(iter(self.entries.items()))
        self.png = self.bb_root / entry["path"]  # the first poisoned test image's file
        self.outside = tmp_path / "outside"
        shutil.copytree(self.record, self.outside)
        shutil.copy(self.png, self.outside / "private.png")

    def save(self, content):
        torch.save(content, self.record / "attack_result.pt")

    def relink(self, path, target):
        """Replace ``path`` (a file or a folder) by a symlink to ``target``."""
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        path.symlink_to(target, target_is_directory=target.is_dir())


def _png_header(width, height):
    """A PNG signature and IHDR chunk claiming ``width`` x ``height`` 8-bit greyscale pixels,
    with an empty image data chunk: Pillow reads the size from it without decoding."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) \
        + chunk(b"IEND", b"")


def _disguise(case, data, pillow_format):
    """Write ``data`` over the first poisoned test PNG, checking that Pillow, unrestricted,
    takes it for ``pillow_format``."""
    case.png.write_bytes(data)
    with Image.open(case.png) as image:
        assert image.format == pillow_format
    case.save(case.content)


def _encoded(image_format, **options):
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, image_format, **options)
    return buffer.getvalue()


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n%%EndComments\n"
       b"0 0 moveto 32 32 lineto stroke\nshowpage\n%%EOF\n")


def _set_entry(case, **fields):
    case.entries[case.sample] = {**case.entries[case.sample], **fields}
    case.save(case.content)


def _set_index(case, value):
    index = case.content["bd_test"]["original_index_array"].copy()
    index[-1] = value
    case.content["bd_test"]["original_index_array"] = index
    case.save(case.content)


def _drop_entry(case):
    del case.entries[case.sample]
    case.save(case.content)


def _change(case, **changes):
    case.save({**case.content, **changes})


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


# (id, what leads out: "path" for a file path, "image" for a file's content, None for a
# broken record; how to break the case; a fragment of the one sentence).
CASES = [
    # paths that lead out of the record's folders
    ("absolute-path", "path", lambda c: _set_entry(c, path=str(c.outside / "private.png")),
     "which resolves to"),
    ("dotdot-path", "path",
     lambda c: _set_entry(c, path=f"./record/{NAME}/../../../outside/private.png"),
     f"is {{bb_root}}/record/{NAME}/../../../outside/private.png, which resolves to"),
    ("file-symlink", "path", lambda c: c.relink(c.png, c.outside / "private.png"),
     "which resolves to {outside}/private.png, outside"),
    ("folder-symlink", "path",
     lambda c: c.relink(c.png.parent, c.outside / c.png.parent.relative_to(c.record)),
     "which resolves to {outside}/bd_test_dataset"),
    ("record-file-symlink", "path",
     lambda c: c.relink(c.record / "attack_result.pt", c.outside / "attack_result.pt"),
     "the record's attack_result.pt is"),
    ("info-symlink", "path",
     lambda c: c.relink(c.record / "info.pickle", c.outside / "info.pickle"),
     "the record's info.pickle is"),
    # files that are not what their name says
    ("eps-named-png", "image", lambda c: _disguise(c, EPS, "EPS"),
     "is not a PNG file"),
    ("jpeg-named-png", "image", lambda c: _disguise(c, _encoded("JPEG"), "JPEG"),
     "is not a PNG file"),
    ("gif-named-png", "image", lambda c: _disguise(c, _encoded("GIF"), "GIF"),
     "is not a PNG file"),
    ("png-over-the-pixel-limit", "image", lambda c: _disguise(c, _png_header(5000, 5000), "PNG"),
     "claims 5000 x 5000 pixels, more than 16777216, so it is not decoded"),
    ("png-over-pillows-limit", "image", lambda c: c.png.write_bytes(_png_header(10**5, 10**5)),
     "claims more than 16777216 pixels, so it is not decoded"),
    # broken files
    ("truncated-attack-result", None, lambda c: _truncate(c.record / "attack_result.pt"),
     "cannot read"),
    ("empty-attack-result", None, lambda c: (c.record / "attack_result.pt").write_bytes(b""),
     "attack_result.pt: the file is empty"),
    ("empty-png", None, lambda c: c.png.write_bytes(b""), "is not a PNG file"),
    ("truncated-png", None, lambda c: _truncate(c.png), "is a broken PNG file"),
    ("missing-png", None, lambda c: c.png.unlink(), "was not found in"),
    # missing and mistyped keys
    ("missing-key", None, lambda c: c.save({k: v for k, v in c.content.items() if k != "bd_test"}),
     "is not a BackdoorBench attack result: it lacks ['bd_test']"),
    ("not-a-dict", None, lambda c: c.save([c.content]), "is not a BackdoorBench attack result"),
    ("num-classes-text", None, lambda c: _change(c, num_classes="10"),
     "num_classes in {record}/attack_result.pt is a str, where BackdoorBench writes a whole"),
    ("clean-data-list", None, lambda c: _change(c, clean_data=["cifar10"]),
     "clean_data in {record}/attack_result.pt is a list"),
    ("model-a-list", None, lambda c: _change(c, model=list(c.content["model"].values())),
     "model in {record}/attack_result.pt is a list, where BackdoorBench writes a state_dict"),
    ("model-value-text", None, lambda c: _change(c, model={"module.conv1.weight": "w"}),
     "maps 'module.conv1.weight' to a str, where a state_dict maps names to tensors"),
    ("bd-test-text", None, lambda c: _change(c, bd_test="bd_test"), "bd_test in"),
    ("bd-test-without-index", None,
     lambda c: _change(c, bd_test={**c.content["bd_test"], "original_index_array": None}),
     "is not the state of a BackdoorBench poisoned data set (reading original_index_array"),
    ("float-index", None, lambda c: _change(c, bd_test={
        **c.content["bd_test"],
        "original_index_array": c.content["bd_test"]["original_index_array"] + 0.5}),
     "reading original_index_array failed"),
    ("img-size-two-numbers", None, lambda c: _change(c, img_size=(32, 32)),
     "must be (height, width, channels)"),
    ("img-size-huge", None, lambda c: _change(c, img_size=(10**5, 10**5, 3)),
     "at most 16777216 pixels"),
    ("path-a-number", None, lambda c: _set_entry(c, path=5), "has no file name and two labels"),
    ("labels-text", None, lambda c: _set_entry(c, other_info=["0", "1"]),
     "has no file name and two labels below 10"),
    ("label-out-of-range", None, lambda c: _set_entry(c, other_info=[0, 10]),
     "has no file name and two labels below 10"),
    ("no-entry-for-a-poisoned-image", None, lambda c: _drop_entry(c),
     "is marked poisoned, but bd_data_container has no file name"),
    # index arrays out of range
    ("index-past-the-end", None, lambda c: _set_index(c, 40), "holds image 40 of a data set of 40"),
    ("negative-index", None, lambda c: _set_index(c, -1), "holds image -1 of a data set of 40"),
    # class counts
    ("class-count-of-another-data-set", None, lambda c: _change(c, num_classes=100),
     "num_classes in {record}/attack_result.pt is 100, but cifar10 has 10 classes"),
    ("weights-of-another-class-count", None,
     lambda c: _change(c, model=preact_resnet18_backdoorbench(100, width=WIDTH).state_dict()),
     "does not fit BackdoorBench's preactresnet18 with 10 classes: size mismatch for linear"),
]


@pytest.fixture
def opened(monkeypatch):
    """Every path opened by open, io.open, os.open or PIL.Image.open, resolved, from now on."""
    paths = []

    def recording(function):
        def wrapper(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)):
                paths.append(os.path.realpath(os.fsdecode(file)))
            return function(file, *args, **kwargs)
        return wrapper

    for owner, name in ((builtins, "open"), (io, "open"), (os, "open"), (Image, "open")):
        monkeypatch.setattr(owner, name, recording(getattr(owner, name)))
    return paths


def _tree(folder):
    """Every entry under ``folder`` (links not followed) with its kind, size and mtime."""
    found = {}
    for parent, folders, files in os.walk(folder):
        for entry in folders + files:
            path = os.path.join(parent, entry)
            status = os.lstat(path)
            found[path] = (status.st_mode, status.st_size, status.st_mtime_ns)
    return found


def _inside(path, folder):
    return os.path.commonpath([path, os.path.realpath(folder)]) == os.path.realpath(folder)


@pytest.mark.parametrize("name,leads_out,build,fragment", CASES, ids=[c[0] for c in CASES])
def test_a_bad_record_is_one_sentence_and_writes_nothing(bench, tmp_path, capsys, opened, name,
                                                        leads_out, build, fragment):
    case = Case(bench, tmp_path)
    build(case)
    fragment = fragment.format(bb_root=case.bb_root, record=case.record, outside=case.outside)
    before = _tree(tmp_path)
    limit = Image.MAX_IMAGE_PIXELS
    del opened[:]

    with pytest.raises((ValueError, FileNotFoundError)) as error:
        bb.load_record(case.record, bench["data"])
    message = str(error.value)
    assert fragment in message and "\n" not in message, message
    assert limit == Image.MAX_IMAGE_PIXELS  # Pillow's global limit is the caller's

    code = main(["clean", "--method", "mbns", "--backdoorbench", str(case.record),
                 "--data-root", str(bench["data"])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and fragment in err, err
    assert _tree(tmp_path) == before and not (case.record / "defense").exists()

    if leads_out is not None:
        assert all(_inside(path, case.bb_root) or _inside(path, bench["data"])
                              for path in opened), opened
    if leads_out == "path":
        # All paths are checked first: only attack_result.pt, inside, was opened.
        assert set(opened) <= {str(case.record / "attack_result.pt")}, opened


def test_the_recorder_sees_the_files_a_good_record_opens(bench, tmp_path, opened):
    # The check above is only as good as the recorder: it must see the record's files, its PNGs
    # and the data set's files when they are read.
    case = Case(bench, tmp_path)
    bb.load_record(case.record, bench["data"])
    assert str(case.record / "attack_result.pt") in opened
    assert str(case.png) in opened
    assert str(bench["data"] / "cifar-10-batches-py" / "test_batch") in opened


def test_paths_inside_the_record_or_bb_root_are_read_wherever_written(bench, tmp_path):
    # An absolute path into the record, and a symlink whose target stays inside, are inside.
    case = Case(bench, tmp_path)
    moved = case.record / "moved.png"
    shutil.move(case.png, moved)
    case.png.symlink_to(moved)
    _set_entry(case, path=str(case.png))
    loaded = bb.load_record(case.record, bench["data"])
    with Image.open(moved) as image:
        expected = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
    assert loaded.bd_test.poisoned[0] and torch.equal(loaded.bd_test.images[0], expected)


def _tiny_record(tmp_path):
    """A Tiny-ImageNet data folder of two classes of two JPEGs per split, and a record over it
    whose bd_test holds the test images, none poisoned: ``(record folder, data root, the first
    training image's file)``."""
    data = tmp_path / "data" / "tiny"
    for split in ("train", "val"):
        for name in ("n01", "n02"):
            folder = data / "tiny-imagenet-200" / split / name / "images"
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (64, 64), (60 * i, 90, 120)).save(folder / f"{i}.JPEG")
    record = tmp_path / "record" / "tiny_demo"
    record.mkdir(parents=True)
    nothing = {"bd_data_container": {"data_dict": {}},
               "original_index_array": np.arange(4, dtype=np.int64),
               "poison_indicator": np.zeros(4)}
    torch.save({"model_name": "preactresnet18", "num_classes": 200,
                "model": preact_resnet18_backdoorbench(200, width=WIDTH).state_dict(),
                "data_path": "./data/tiny", "img_size": (64, 64, 3), "clean_data": "tiny",
                "bd_train": None, "bd_test": nothing}, record / "attack_result.pt")
    return record, data, data / "tiny-imagenet-200" / "train" / "n01" / "images" / "0.JPEG"


@pytest.mark.parametrize("content,fragment", [
    (EPS, "is not a JPEG or PNG or PPM or BMP or TIFF or WEBP file"),
    (_png_header(5000, 5000), "claims 5000 x 5000 pixels, more than 16777216"),
], ids=["eps-named-jpeg", "png-over-the-pixel-limit"])
def test_data_set_images_open_as_raster_formats_within_the_limit(tmp_path, content, fragment):
    record, data, first = _tiny_record(tmp_path)
    assert len(bb.load_record(record, data).clean_train) == 4
    first.write_bytes(content)
    with pytest.raises(ValueError) as error:
        bb.load_record(record, data)
    message = str(error.value)
    assert f"Tiny-ImageNet image {first} {fragment}" in message and "\n" not in message, message
