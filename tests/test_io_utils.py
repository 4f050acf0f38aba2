"""Tests for `rnp_tf.io_utils`."""

import json
import os
import stat

import numpy as np
import pytest

from rnp_tf import io_utils


def _write_text(text):
    def fn(tmp_path):
        with open(tmp_path, "w") as f:
            f.write(text)

    return fn


def _leftovers(directory, keep):
    return sorted(set(os.listdir(directory)) - set(keep))


def test_atomic_write_file_roundtrip(tmp_path):
    target = tmp_path / "a.txt"
    out = io_utils.atomic_write(target, _write_text("hello"))
    assert out == str(target)
    assert target.read_text() == "hello"
    # Overwrite an existing file.
    io_utils.atomic_write(str(target), _write_text("bye"))
    assert target.read_text() == "bye"
    assert _leftovers(tmp_path, ["a.txt"]) == []


def test_atomic_write_temp_is_hidden_sibling(tmp_path):
    seen = []

    def fn(tmp):
        seen.append(tmp)
        assert os.path.dirname(tmp) == str(tmp_path)
        assert os.path.basename(tmp).startswith(".a.txt.tmp-")
        with open(tmp, "w") as f:
            f.write("x")

    io_utils.atomic_write(tmp_path / "a.txt", fn)
    assert not os.path.exists(seen[0])


def test_atomic_write_keep_suffix(tmp_path):
    def fn(tmp):
        base = os.path.basename(tmp)
        assert base.startswith(".tmp-") and base.endswith(".m.keras")
        with open(tmp, "w") as f:
            f.write("x")

    io_utils.atomic_write(tmp_path / "m.keras", fn, keep_suffix=True)
    assert (tmp_path / "m.keras").read_text() == "x"


def test_atomic_write_default_permissions(tmp_path):
    target = tmp_path / "p.txt"
    io_utils.atomic_write(target, _write_text("x"))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_write_failure_keeps_old_file(tmp_path, exc):
    target = tmp_path / "a.txt"
    target.write_text("old")

    def fn(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise exc("boom")

    with pytest.raises(exc, match="boom"):
        io_utils.atomic_write(target, fn)
    assert target.read_text() == "old"
    assert _leftovers(tmp_path, ["a.txt"]) == []


def test_atomic_write_failure_without_previous_file(tmp_path):
    def fn(tmp):
        raise ValueError("nope")

    with pytest.raises(ValueError, match="nope"):
        io_utils.atomic_write(tmp_path / "new.txt", fn)
    assert os.listdir(tmp_path) == []


def test_atomic_write_directory_mode(tmp_path):
    def make(content):
        def fn(tmp):
            assert os.path.isdir(tmp)
            os.makedirs(os.path.join(tmp, "sub"))
            with open(os.path.join(tmp, "sub", "f.txt"), "w") as f:
                f.write(content)

        return fn

    target = tmp_path / "export"
    io_utils.atomic_write(str(target) + "/", make("v1"))
    assert (target / "sub" / "f.txt").read_text() == "v1"
    # Replace an existing directory (with the keyword this time).
    io_utils.atomic_write(target, make("v2"), directory=True)
    assert (target / "sub" / "f.txt").read_text() == "v2"
    assert _leftovers(tmp_path, ["export"]) == []

    # A failure leaves the previous directory untouched.
    def bad(tmp):
        with open(os.path.join(tmp, "junk"), "w") as f:
            f.write("x")
        raise RuntimeError("fail")

    with pytest.raises(RuntimeError):
        io_utils.atomic_write(target, bad, directory=True)
    assert sorted(os.listdir(target)) == ["sub"]
    assert (target / "sub" / "f.txt").read_text() == "v2"
    assert _leftovers(tmp_path, ["export"]) == []


def test_atomic_write_missing_parent(tmp_path):
    with pytest.raises(FileNotFoundError, match="parent directory"):
        io_utils.atomic_write(tmp_path / "nope" / "a.txt", _write_text("x"))
    with pytest.raises(FileNotFoundError):
        io_utils.write_json(tmp_path / "nope" / "a.json", {})


def test_atomic_write_type_conflicts(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        io_utils.atomic_write(tmp_path / "d", _write_text("x"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        io_utils.atomic_write(tmp_path / "f", lambda tmp: None, directory=True)
    with pytest.raises(ValueError, match="callable"):
        io_utils.atomic_write(tmp_path / "g", "not callable")


def test_atomic_write_writer_that_moves_temp(tmp_path):
    # e.g. numpy.save appends ".npy" when the name lacks it.
    def fn(tmp):
        os.remove(tmp)
        with open(tmp + ".npy", "w") as f:
            f.write("x")
        os.remove(tmp + ".npy")

    with pytest.raises(RuntimeError, match="keep_suffix"):
        io_utils.atomic_write(tmp_path / "a.npy", fn)
    assert os.listdir(tmp_path) == []


def test_write_json_numpy_and_nan(tmp_path):
    target = tmp_path / "m.json"
    obj = {
        "z_first": 1,
        "acc": np.float32(0.5),
        "n": np.int64(7),
        "flag": np.bool_(True),
        "arr": np.arange(3, dtype=np.int32),
        "mat": np.array([[1.5, np.nan]]),
        "nan": float("nan"),
        "inf": np.float64(np.inf),
        "nested": [{"x": np.float16(2.0)}, (np.uint8(3),)],
        np.int64(5): "numpy key",
    }
    assert io_utils.write_json(target, obj) == str(target)
    text = target.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert text.startswith('{\n  "z_first": 1')  # indent=2, insertion order
    data = io_utils.read_json(target)
    assert data == {
        "z_first": 1,
        "acc": 0.5,
        "n": 7,
        "flag": True,
        "arr": [0, 1, 2],
        "mat": [[1.5, None]],
        "nan": None,
        "inf": None,
        "nested": [{"x": 2.0}, [3]],
        "5": "numpy key",
    }
    assert list(data) == [
        "z_first", "acc", "n", "flag", "arr", "mat", "nan", "inf", "nested",
        "5",
    ]
    assert json.loads(text) == data
    assert _leftovers(tmp_path, ["m.json"]) == []


def test_write_json_unserializable_keeps_old(tmp_path):
    target = tmp_path / "m.json"
    io_utils.write_json(target, {"a": 1})
    with pytest.raises(TypeError, match="object"):
        io_utils.write_json(target, {"a": object()})
    assert io_utils.read_json(target) == {"a": 1}
    assert _leftovers(tmp_path, ["m.json"]) == []


def test_read_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        io_utils.read_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,')
    with pytest.raises(ValueError, match="bad.json"):
        io_utils.read_json(bad)
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.json"):
        io_utils.read_json(empty)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="bin.json"):
        io_utils.read_json(binary)


def test_save_model_atomic_roundtrip(tmp_path):
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    expected = model.predict(x, verbose=0)
    target = tmp_path / "m.keras"
    assert io_utils.save_model_atomic(model, target) == str(target)
    # Saving again over an existing checkpoint works too.
    io_utils.save_model_atomic(model, str(target))
    assert _leftovers(tmp_path, ["m.keras"]) == []
    restored = keras.saving.load_model(str(target))
    np.testing.assert_array_equal(restored.predict(x, verbose=0), expected)


def test_save_model_atomic_failure_keeps_old(tmp_path):
    target = tmp_path / "m.keras"
    target.write_bytes(b"old checkpoint")

    class Broken:
        def save(self, filepath):
            with open(filepath, "wb") as f:
                f.write(b"partial")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        io_utils.save_model_atomic(Broken(), target)
    assert target.read_bytes() == b"old checkpoint"
    assert _leftovers(tmp_path, ["m.keras"]) == []


def test_save_model_atomic_requires_keras_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\.keras"):
        io_utils.save_model_atomic(object(), tmp_path / "m.h5")


def test_check_writable_dir_probes_and_leaves_nothing(tmp_path):
    target = tmp_path / "a" / "b"
    assert io_utils.check_writable_dir(target, "--output_dir") == str(target)
    assert not (tmp_path / "a").exists()  # the folders it made are gone again
    target.mkdir(parents=True)
    (target / "kept.txt").write_text("x")
    io_utils.check_writable_dir(target, "--output_dir")
    assert os.listdir(target) == ["kept.txt"]


@pytest.mark.parametrize("where", ["/proc/rnp_probe", "file", "file/below", ""])
def test_check_writable_dir_fails_in_one_line_naming_the_flag(tmp_path, where):
    (tmp_path / "file").write_text("x")
    path = where if where.startswith("/") or not where else str(tmp_path / where)
    with pytest.raises(ValueError, match=r"^--model_dir[: ]") as error:
        io_utils.check_writable_dir(path, "--model_dir")
    assert "\n" not in str(error.value)
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_remove_leftovers_of_an_interrupted_write(tmp_path):
    (tmp_path / "kept").mkdir()
    (tmp_path / ".kept.tmp-ab12").mkdir()  # a directory write killed before its rename
    (tmp_path / ".kept.old-ab12cd34").mkdir()  # ... killed after renaming the old one aside
    (tmp_path / ".tmp-ab12.model.keras").write_text("half")
    (tmp_path / ".hidden").write_text("not ours")
    assert io_utils.remove_leftovers(tmp_path) == [".kept.old-ab12cd34", ".kept.tmp-ab12", ".tmp-ab12.model.keras"]
    assert sorted(os.listdir(tmp_path)) == [".hidden", "kept"]
    assert io_utils.remove_leftovers(tmp_path / "missing") == []
