"""bdfast.interop.backdoorbench and ``bdfast clean --backdoorbench``, on a record written here in
BackdoorBench's format (utils/save_load_attack.py and utils/bd_dataset_v2.py of
github.com/SCLBD/BackdoorBench, commit f02e3534645f0ee63d6848653062cd6c0d6c400d) over a small
fake CIFAR-10 in torchvision's files: no network, no real data."""
from __future__ import annotations

import csv
import io
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from bdfast.cli import main
from bdfast.interop import backdoorbench as bb
from bdfast.lab.metrics import predict
from bdfast.lab.models import preact_resnet18, preact_resnet18_backdoorbench

Image = pytest.importorskip("PIL.Image")

PER_BATCH, TEST_IMAGES, TARGET, WIDTH = 20, 40, 0, 8
NAME = "badnet_demo"


def _fake_cifar10(root):
    """torchvision's cifar-10-batches-py: five training batches and a test batch, each a pickled
    dict with ``data`` (uint8 [N, 3072], the channels one after another) and ``labels``."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    arrays = {}
    for name in names:
        count = TEST_IMAGES if name == "test_batch" else PER_BATCH
        data = rng.integers(0, 200, size=(count, 3072), dtype=np.uint8)
        labels = [i % 10 for i in range(count)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels,
                         "filenames": [f"{i}.png" for i in range(count)]}, f, protocol=2)
        arrays[name] = (data.reshape(-1, 3, 32, 32), np.array(labels))
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f, protocol=2)
    train = tuple(np.concatenate(parts) for parts in zip(*(arrays[n] for n in names[:5])))
    return train, arrays["test_batch"]


def _triggered(image_chw: np.ndarray) -> np.ndarray:
    """A copy with a white 3x3 patch in the bottom-right corner, as HWC for PIL."""
    out = image_chw.transpose(1, 2, 0).copy()
    out[-3:, -3:] = 255
    return out


def _poisoned_state(images, labels, indicator, index, folder_name, bb_root):
    """What prepro_cls_DatasetBD_v2.retrieve_state() returns for a data set whose poisoned
    images went to PNG files: numpy index and indicator arrays, numpy int64 keys."""
    save_folder = f"./record/{NAME}/{folder_name}"
    entries = {}
    for i in index:  # iterating a numpy array yields numpy int64, as BackdoorBench's loop does
        if indicator[i] != 1:
            continue
        label = int(labels[i])
        path = f"{save_folder}/{label}/{i}.png"
        (bb_root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_triggered(images[i])).save(bb_root / path)
        entries[i] = {"path": path, "other_info": [TARGET, label]}
    return {"bd_data_container": {"save_folder_path": save_folder, "data_dict": entries,
                                  "save_file_format": ".png"},
            "getitem_all": True, "getitem_all_switch": False, "original_index_array": index,
            "poison_indicator": indicator, "save_folder_path": save_folder}


def build_bench(bb_root):
    """A BackdoorBench folder at ``bb_root``: data/cifar10 (fake) and record/<NAME> of an
    all-to-one attack on a narrow preactresnet18 in their layout, saved as nn.DataParallel
    saves (module.<key>)."""
    data_root = bb_root / "data" / "cifar10"
    (x_train, y_train), (x_test, y_test) = _fake_cifar10(data_root)
    record = bb_root / "record" / NAME
    record.mkdir(parents=True)

    train_indicator = np.zeros(len(y_train))
    train_indicator[np.arange(0, len(y_train), 10) + 3] = 1  # 10% poisoned
    test_indicator = (y_test != TARGET).astype(np.float64)
    bd_train = _poisoned_state(x_train, y_train, train_indicator, np.arange(len(y_train)),
                               "bd_train_dataset", bb_root)
    bd_test = _poisoned_state(x_test, y_test, test_indicator, np.where(test_indicator == 1)[0],
                              "bd_test_dataset", bb_root)
    torch.manual_seed(0)
    network = preact_resnet18_backdoorbench(10, width=WIDTH)
    content = {"model_name": "preactresnet18", "num_classes": 10,
               "model": {f"module.{k}": v for k, v in network.state_dict().items()},
               "data_path": "./data/cifar10", "img_size": (32, 32, 3), "clean_data": "cifar10",
               "bd_train": bd_train, "bd_test": bd_test}
    torch.save(content, record / "attack_result.pt")
    torch.save({"attack": "badnet", "attack_target": TARGET, "pratio": 0.1}, record / "info.pickle")
    return {"root": bb_root, "data": data_root, "record": record, "content": content,
            "network": network, "train": (x_train, y_train, train_indicator),
            "test": (x_test, y_test, test_indicator)}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return build_bench(tmp_path_factory.mktemp("BackdoorBench"))


@pytest.fixture(scope="module")
def loaded(bench):
    return bb.load_record(bench["record"], bench["data"])


def _copy_record(bench, tmp_path, **changes):
    """A copy of the record (PNGs included) whose attack_result.pt has ``changes``."""
    root = tmp_path / "BackdoorBench"
    shutil.copytree(bench["root"] / "record", root / "record")
    content = {**bench["content"], **changes}
    torch.save(content, root / "record" / NAME / "attack_result.pt")
    return root / "record" / NAME


# ----------------------------------------------------------------------------- reading

def test_load_record_reads_model_data_and_metadata(bench, loaded):
    assert (loaded.model_name, loaded.num_classes, loaded.img_size, loaded.clean_data) == \
        ("preactresnet18", 10, (32, 32, 3), "cifar10")
    assert (loaded.attack, loaded.target) == ("badnet", TARGET)
    x_train, y_train, train_indicator = bench["train"]
    assert torch.equal(loaded.clean_train.images, torch.from_numpy(x_train))
    assert torch.equal(loaded.clean_train.labels, torch.from_numpy(y_train))
    assert torch.equal(loaded.clean_test.images, torch.from_numpy(bench["test"][0]))

    # bd_train: the clean images in their order, the poisoned ones from their PNGs.
    bd_train, poisoned = loaded.bd_train, train_indicator == 1
    assert torch.equal(bd_train.poisoned, torch.from_numpy(poisoned))
    assert torch.equal(bd_train.images[~poisoned], loaded.clean_train.images[~poisoned])
    assert bool((bd_train.images[poisoned][..., -3:, -3:] == 255).all())
    assert bool((bd_train.labels[poisoned] == TARGET).all())
    assert torch.equal(bd_train.original_labels, loaded.clean_train.labels)

    # bd_test: only the non-target images, all triggered, with both labels.
    x_test, y_test, test_indicator = bench["test"]
    keep = np.where(test_indicator == 1)[0]
    assert len(loaded.bd_test) == len(keep) and bool(loaded.bd_test.poisoned.all())
    assert torch.equal(loaded.bd_test.original_labels, torch.from_numpy(y_test[keep]))
    expected = torch.from_numpy(np.stack([_triggered(x_test[i]) for i in keep])).permute(0, 3, 1, 2)
    assert torch.equal(loaded.bd_test.images, expected)
    image, label = loaded.bd_test[0]
    assert image.dtype == torch.float32 and float(image.max()) <= 1 and label == TARGET


def test_the_model_takes_images_in_0_1_and_holds_the_record_weights(bench, loaded):
    network = loaded.model.model
    assert type(network).__name__ == "PreActResNet18" and network.bn is None
    saved = bench["network"].state_dict()
    assert list(network.state_dict()) == list(saved)
    assert all(torch.equal(v, saved[k]) for k, v in network.state_dict().items())
    x = torch.rand(3, 3, 32, 32)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.247, 0.243, 0.261]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), network.eval()((x - mean) / std))
    # The wrapper adds no keys of its own: the state_dict is the network's under model.
    assert list(loaded.model.state_dict()) == [f"model.{k}" for k in saved]


def test_evaluate_record_follows_the_definitions(loaded):
    metrics = bb.evaluate_record(loaded.model, loaded)
    with torch.no_grad():
        clean = predict(loaded.model, loaded.clean_test.tensors()[0])
        triggered = predict(loaded.model, loaded.bd_test.tensors()[0])
    assert metrics["acc"] == pytest.approx((clean == loaded.clean_test.labels).float().mean())
    assert metrics["asr"] == pytest.approx((triggered == TARGET).float().mean())
    assert metrics["ra"] == pytest.approx(
        (triggered == loaded.bd_test.original_labels).float().mean())


def test_clean_subset_is_seeded_and_sized_by_the_ratio(loaded):
    x, y = bb.clean_subset(loaded.clean_train, 0.2, seed=3)
    again, _ = bb.clean_subset(loaded.clean_train, 0.2, seed=3)
    other, _ = bb.clean_subset(loaded.clean_train, 0.2, seed=4)
    assert x.shape == (20, 3, 32, 32) and y.shape == (20,) and x.dtype == torch.float32
    assert torch.equal(x, again) and not torch.equal(x, other)
    assert len(bb.clean_subset(loaded.clean_train)[0]) == 5  # 0.05 of 100, BackdoorBench's ratio
    for ratio in (0, 1.5, True):
        with pytest.raises(ValueError, match="ratio must be a fraction"):
            bb.clean_subset(loaded.clean_train, ratio)


# ----------------------------------------------------------------------------- safe loading

def test_the_record_needs_the_numpy_allow_list_and_nothing_more(bench):
    path = bench["record"] / "attack_result.pt"
    # numpy 1 writes numpy.core where numpy 2 writes numpy._core.
    unsafe = {name.replace("numpy.core.", "numpy._core.")
              for name in torch.serialization.get_unsafe_globals_in_checkpoint(path)}
    assert unsafe == {"numpy.ndarray", "numpy.dtype", "numpy._core.multiarray._reconstruct",
                      "numpy._core.multiarray.scalar"}
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_a_record_written_under_numpy_1_loads(bench, tmp_path):
    # numpy 1 names its pickling helpers numpy.core.multiarray, numpy 2 numpy._core.multiarray.
    record = _copy_record(bench, tmp_path)
    buffer = io.BytesIO()
    torch.save(bench["content"], buffer, _use_new_zipfile_serialization=False)
    raw = buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in raw
    (record / "attack_result.pt").write_bytes(raw)
    loaded = bb.load_record(record, bench["data"])
    assert len(loaded.bd_test) == int(bench["test"][2].sum())


class _RunsCode:
    """Pickles to a call of os.mkdir: what a hostile record would run on load."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_record_with_other_objects_is_refused_unread(bench, tmp_path):
    marker = tmp_path / "ran"
    record = _copy_record(bench, tmp_path, data_path=_RunsCode(str(marker)))
    with pytest.raises(ValueError, match="mkdir, which is not a tensor") as error:
        bb.load_record(record, bench["data"])
    assert not marker.exists() and "\n" not in str(error.value)


# ----------------------------------------------------------------------------- bad input

def _drop(mapping, key):
    return {k: v for k, v in mapping.items() if k != key}


BAD_RECORDS = [
    ("unsupported model", {"model_name": "vit_b_16"}, ValueError,
     "the record's model 'vit_b_16' is not supported; bdfast reads preactresnet18, resnet18"),
    ("unsupported data set", {"clean_data": "celeba"}, ValueError,
     "the record's data set 'celeba' is not supported; bdfast reads cifar10, cifar100, mnist"),
    ("weights of another layout",
     {"model": _drop(preact_resnet18(10, width=WIDTH).state_dict(), "linear.bias")}, ValueError,
     "does not fit BackdoorBench's preactresnet18 with 10 classes: Missing key(s)"),
    ("bad img_size", {"img_size": "32x32"}, ValueError,
     "must be (height, width, channels) with 1 or 3 channels and at most 16777216 pixels, "
     "got '32x32'"),
    ("not a poisoned data set state", {"bd_test": {"poison_indicator": []}}, ValueError,
     "the bd_test of"),
]


@pytest.mark.parametrize("case,changes,kind,fragment", BAD_RECORDS,
                         ids=[c[0] for c in BAD_RECORDS])
def test_bad_records_are_one_sentence(bench, tmp_path, case, changes, kind, fragment):
    record = _copy_record(bench, tmp_path, **changes)
    with pytest.raises(kind) as error:
        bb.load_record(record, bench["data"])
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_missing_files_name_what_and_where(bench, tmp_path):
    def fails(kind, fragment, record, data_root):
        with pytest.raises(kind) as error:
            bb.load_record(record, data_root)
        message = str(error.value)
        assert fragment in message and "\n" not in message, message

    empty = tmp_path / "empty"
    empty.mkdir()
    fails(FileNotFoundError, f"attack_result.pt was not found in {empty}", empty, bench["data"])
    fails(FileNotFoundError, f"CIFAR-10 file data_batch_1 was not found in "
          f"{empty / 'cifar-10-batches-py'}; data_root must be", bench["record"], empty)
    record = _copy_record(bench, tmp_path)
    first = np.where(bench["test"][2] == 1)[0][0]
    png = record / "bd_test_dataset" / str(int(bench["test"][1][first])) / f"{first}.png"
    png.unlink()
    fails(FileNotFoundError, f"poisoned image of the bd_test {first}.png was not found in "
          f"{png.parent}", record, bench["data"])
    # A data set of another size than the one the record indexes.
    small = tmp_path / "small"
    shutil.copytree(bench["data"], small)
    with open(small / "cifar-10-batches-py" / "test_batch", "rb") as f:
        batch = pickle.load(f)
    batch["data"], batch["labels"] = batch["data"][:10], batch["labels"][:10]
    with open(small / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    fails(ValueError, "indexes a data set of 40 images, but the one under data_root has 10",
          bench["record"], small)


@pytest.mark.parametrize("rename", [lambda i, key: f"module.net.{key}",
                                    lambda i, key: f"module.p{i}", lambda i, key: f"p{i}"],
                         ids=["prefix", "module-and-names", "names"])
def test_weights_under_other_names_load_by_position_with_one_line(bench, loaded, tmp_path,
                                                                   rename):
    # BackdoorBench's load_attack_result drops module. and then renames by position.
    saved = bench["network"].state_dict()
    state = {rename(i, key): value for i, (key, value) in enumerate(saved.items())}
    record = _copy_record(bench, tmp_path, model=state)
    with pytest.warns(UserWarning, match="tensors otherwise than BackdoorBench's preactresnet18 "
                      "with 10 classes") as caught:
        again = bb.load_record(record, bench["data"])
    message = str(caught[0].message)
    assert len(caught) == 1 and "\n" not in message and "conv1.weight" in message, message
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again.model(x), loaded.model(x))


def test_weights_that_differ_by_more_than_names_are_refused(bench, tmp_path):
    values = list(bench["network"].state_dict().values())
    # Two neighbours of different shapes swapped (after the 4-D stem, which the net's width is
    # taken from): same count, renamed, but not the same shapes position by position.
    i = next(i for i in range(1, len(values) - 1) if values[i].shape != values[i + 1].shape)
    values[i], values[i + 1] = values[i + 1], values[i]
    cases = [({f"p{j}": v for j, v in enumerate(values)},
              f"not even by position: its tensor {i}, p{i}, has shape"),
             ({f"p{j}": v for j, v in enumerate(values[:-1])}, "Missing key(s)")]
    for state, fragment in cases:
        record = _copy_record(bench, tmp_path / fragment[:7], model=state)
        with pytest.raises(ValueError) as error:
            bb.load_record(record, bench["data"])
        message = str(error.value)
        assert "does not fit BackdoorBench's preactresnet18" in message and fragment in message \
            and "\n" not in message, message


def test_torchvision_models_are_built_by_name(bench, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    network = torchvision.models.resnet18(num_classes=10)
    record = _copy_record(bench, tmp_path, model_name="resnet18", model=network.state_dict())
    loaded = bb.load_record(record, bench["data"])
    assert type(loaded.model.model) is type(network)
    assert loaded.model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


# ----------------------------------------------------------------------------- writing

def test_saved_result_loads_into_their_layout_key_for_key(bench, loaded, tmp_path):
    record = _copy_record(bench, tmp_path)
    metrics = {"acc": 0.5, "asr": 0.25, "ra": 0.125}
    path = bb.save_defense_result(record, "mbns", loaded.model, metrics)
    assert path == record / "defense" / "bdfast-mbns" / "defense_result.pt"
    # Plain tensors and values only: it loads without any allow-list.
    result = torch.load(path, weights_only=True)
    assert set(result) == {"model_name", "num_classes", "model"}
    assert (result["model_name"], result["num_classes"]) == ("preactresnet18", 10)
    fresh = preact_resnet18_backdoorbench(10, width=WIDTH)
    fresh.load_state_dict(result["model"], strict=True)
    assert list(result["model"]) == list(fresh.state_dict())
    inner = loaded.model.model.state_dict()
    assert all(torch.equal(v, inner[k]) for k, v in result["model"].items())
    with open(path.parent / "bdfast-mbns_df_summary.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["", "test_acc", "test_asr", "test_ra"], ["0", "0.5", "0.25", "0.125"]]


def test_saving_a_model_of_another_layout_writes_nothing(bench, tmp_path):
    record = _copy_record(bench, tmp_path)
    with pytest.raises(ValueError, match="the model to save .* does not fit"):
        bb.save_defense_result(record, "medic", preact_resnet18(10, width=WIDTH),
                               {"acc": 1.0, "asr": 0.0, "ra": 1.0})
    with pytest.raises(ValueError, match="metrics lacks"):
        bb.save_defense_result(record, "medic", preact_resnet18_backdoorbench(10, width=WIDTH),
                               {"acc": 1.0})
    assert not (record / "defense").exists()


# ----------------------------------------------------------------------------- the CLI

@pytest.mark.parametrize("method,options", [
    ("medic", ["--option", "epochs=1"]),
    ("bcu", ["--option", "epochs=1"]),
    ("dde", []),
    ("dde", ["--option", "u=auto"]),
    ("mbns", []),
])
def test_cli_cleans_a_record_and_writes_the_result(bench, tmp_path, capsys, method, options):
    record = _copy_record(bench, tmp_path)
    code = main(["clean", "--backdoorbench", str(record), "--data-root", str(bench["data"]),
                 "--method", method, "--clean-ratio", "0.2", "--option", "progress=False",
                 *options])
    printed = capsys.readouterr().out
    assert code == 0
    assert "before" in printed and "after" in printed
    # The success line names the data the defense read: DDE reads the poisoned training set,
    # and the clean subset only to choose u="auto"; the others read the clean subset.
    read = printed.splitlines()[0].split("; read ", 1)[1]
    if method == "dde":
        assert read.startswith("the ") and "poisoned training images of the record" in read
        assert ("20 clean images (0.2 of the clean training set) to choose u" in read) \
            == ("u=auto" in options), read
    else:
        assert read == "20 clean images (0.2 of the clean training set))", read
    result = torch.load(record / "defense" / f"bdfast-{method}" / "defense_result.pt",
                        weights_only=True)
    preact_resnet18_backdoorbench(10, width=WIDTH).load_state_dict(result["model"], strict=True)
    assert (record / "defense" / f"bdfast-{method}" / f"bdfast-{method}_df_summary.csv").exists()


def test_cli_bad_backdoorbench_input_is_one_line_and_exit_2(bench, tmp_path, capsys):
    record = _copy_record(bench, tmp_path)
    no_train = _copy_record(bench, tmp_path / "no_train", bd_train=None)
    base = ["clean", "--method", "mbns", "--backdoorbench", str(record)]
    data = ["--data-root", str(bench["data"])]
    cases = [
        (base, "--backdoorbench needs --data-root DIR"),
        (base + data + ["--arch", "m:f", "--out", "x.pt"], "takes no --arch, --out"),
        (base + data + ["--clean-ratio", "0"], "--clean-ratio must be a fraction in (0, 1]"),
        (base + data + ["--clean-ratio", "0.001"], "is no image at all"),
        (base + ["--data-root", str(tmp_path)], "CIFAR-10 file data_batch_1 was not found"),
        (["clean", "--method", "mbns", "--backdoorbench", str(tmp_path / "none")] + data,
         "attack_result.pt was not found"),
        (["clean", "--method", "dde", "--backdoorbench", str(no_train)] + data,
         "dde needs the poisoned training set, and the record"),
        (["clean", "--method", "mbns"] + data, "--data-root goes with --backdoorbench"),
        (["clean", "--method", "mbns"], "clean needs --arch, --weights, --data, --out"),
    ]
    for argv, fragment in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err, (argv, err)
    assert not (record / "defense").exists() and not (no_train / "defense").exists()
