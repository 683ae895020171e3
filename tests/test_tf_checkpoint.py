"""TensorFlow checkpoints read without TensorFlow, tensor for tensor.

TensorFlow runs in a subprocess, once for the module, and is never imported here: it
registers tensorflow.BundleEntryProto & co. in protobuf's default pool, and the reader must
be shown not to need it. The subprocess writes

    tf1/          tf.compat.v1.train.Saver(sharded=True) in graph mode, variables on two CPU
                  devices, so two data shards: DeepLab names (xception_65/...), Momentum
                  slots, global_step, float16, bfloat16 and the other numeric dtypes
    tf2/          tf.train.Checkpoint: object-based names, a string variable, the object graph
    v1/           a V1 checkpoint (Saver(write_version=V1)): one file, no .index
    saved_model/  tf.saved_model.save
    partitioned/  a variable saved in two slices

and beside each checkpoint what TensorFlow's own reader (tf.train.load_checkpoint) says:
NAME.json (dtype, shape, string values) and NAME.npz (the arrays; bfloat16 as its bits).
Then it loads our reader into its own process and compares there too (from the module's
file: `import segment_deeplab.models` brings torchvision, which dies with SIGSEGV when
imported after TensorFlow, whatever the reader does).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from segment_deeplab.models import tf_checkpoint
from segment_deeplab.models.tf_checkpoint import TFCheckpointError, list_checkpoint, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
NO_TF = (
    "tensorflow-cpu is not installed (`pip install -e .[tf-tests]`; no wheel for this platform?)"
)
WEIGHTS = "xception_65/entry_flow/conv1_1/weights"
pytestmark = pytest.mark.slow  # a TensorFlow process writes the checkpoints: ~25 s

_TF_SCRIPT = r"""
import json, sys
from pathlib import Path

import numpy as np
import tensorflow as tf

tf1 = tf.compat.v1
work = Path(sys.argv[1])
rng = np.random.default_rng(0)


def var(name, value, **kw):
    return tf1.get_variable(name, initializer=value, trainable=kw.pop("trainable", False), **kw)


def tf1_checkpoint(prefix):
    with tf.Graph().as_default():
        with tf.device("/cpu:0"):
            w = var("xception_65/entry_flow/conv1_1/weights",
                    rng.standard_normal((3, 3, 3, 8)).astype(np.float32), trainable=True)
            mean = var("xception_65/entry_flow/conv1_1/BatchNorm/moving_mean",
                       rng.standard_normal(8).astype(np.float32))
            step = tf1.train.get_or_create_global_step()
        with tf.device("/cpu:1"):
            gamma = var("xception_65/entry_flow/conv1_1/BatchNorm/gamma",
                        np.ones(8, np.float32), trainable=True)
            var("extra/half", rng.standard_normal(5).astype(np.float16))
            var("extra/bfloat16", tf.constant(rng.standard_normal(6), tf.bfloat16))
            var("extra/float64", rng.standard_normal((2, 3)))
            var("extra/int8", np.arange(-3, 3, dtype=np.int8))
            var("extra/uint8", np.arange(250, 256, dtype=np.uint8))
            var("extra/int32", np.array([[1, -2], [3, 2**31 - 1]], np.int32))
            var("extra/bool", np.array([True, False, True]))
            var("extra/empty", np.zeros((0, 4), np.float32))
            var("extra/scalar", np.float32(2.5))
        x = tf.constant(rng.standard_normal((2, 9, 9, 3)).astype(np.float32))
        loss = tf.reduce_mean((tf.nn.conv2d(x, w, 1, "SAME") * gamma + mean) ** 2)
        train = tf1.train.MomentumOptimizer(0.01, 0.9).minimize(loss, global_step=step)
        saver = tf1.train.Saver(sharded=True)
        with tf1.Session(config=tf1.ConfigProto(device_count={"CPU": 2})) as sess:
            sess.run(tf1.global_variables_initializer())
            for _ in range(3):
                sess.run(train)
            return saver.save(sess, str(prefix), global_step=step)


def graph_checkpoint(prefix, make, **saver_kw):
    with tf.Graph().as_default():
        make()
        saver = tf1.train.Saver(**saver_kw)
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            return saver.save(sess, str(prefix), write_meta_graph=False)


def model():
    m, m.layer = tf.Module(), tf.Module()
    m.layer.kernel = tf.Variable(rng.standard_normal((3, 3, 4, 2)).astype(np.float32))
    m.layer.bias = tf.Variable(np.zeros(2, np.float32))
    m.words = tf.Variable([b"ab", b"", "\u00e9".encode()])
    m.steps = tf.Variable(np.int64(7))
    return m


def describe(prefix, out):
    # what TensorFlow's own reader says: NAME.json and NAME.npz
    reader = tf.train.load_checkpoint(prefix)
    dtypes, meta, arrays = reader.get_variable_to_dtype_map(), {}, {}
    for i, (name, shape) in enumerate(sorted(reader.get_variable_to_shape_map().items())):
        meta[name] = {"dtype": dtypes[name].name, "shape": shape, "key": f"a{i}"}
        if "part/" in name:
            continue
        t = reader.get_tensor(name)
        if dtypes[name] == tf.string:
            meta[name]["strings"] = [v.hex() for v in np.asarray(t, dtype=object).ravel()]
        else:
            arrays[f"a{i}"] = t.view(np.uint16) if dtypes[name] == tf.bfloat16 else t
    np.savez(out.with_suffix(".npz"), **arrays)
    out.with_suffix(".json").write_text(json.dumps(meta))
    return reader


for d in ("tf1", "v1", "partitioned"):
    (work / d).mkdir(parents=True)
prefixes = {
    "tf1": tf1_checkpoint(work / "tf1" / "model.ckpt"),
    "tf2": tf.train.Checkpoint(model=model()).save(str(work / "tf2" / "ckpt")),
    "partitioned": graph_checkpoint(work / "partitioned" / "model.ckpt", lambda: var(
        "part/w", tf1.ones_initializer(), shape=[4, 3],
        partitioner=tf1.fixed_size_partitioner(2))),
}
graph_checkpoint(work / "v1" / "model.ckpt", lambda: var("a", np.ones(3, np.float32)),
                 write_version=tf1.train.SaverDef.V1)
tf.saved_model.save(model(), str(work / "saved_model"))
prefixes["saved_model"] = str(work / "saved_model" / "variables" / "variables")
readers = {name: describe(p, work / name) for name, p in prefixes.items()}

# Our reader in a process that holds TensorFlow (and its protobuf messages), loaded from
# its file: `import segment_deeplab.models` brings torchvision, and torchvision imported
# after TensorFlow dies (SIGSEGV, in triton's import), whatever the reader does.
import importlib.util

spec = importlib.util.spec_from_file_location("tf_checkpoint", sys.argv[2])
reader_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reader_module)
read_checkpoint = reader_module.read_checkpoint

differ = []
for name in ("tf1", "tf2", "saved_model"):
    ours = read_checkpoint(prefixes[name], strings=True)
    names = set(readers[name].get_variable_to_shape_map())
    differ += [f"{name}: names {sorted(set(ours) ^ names)}"] if set(ours) != names else []
    for key, array in ours.items():
        string = readers[name].get_variable_to_dtype_map()[key] == tf.string
        want = np.asarray(readers[name].get_tensor(key), dtype=object if string else None)
        if array.dtype != want.dtype or not np.array_equal(array, want):
            differ.append(f"{name}: {key}")
(work / "in_process.json").write_text(json.dumps(differ))
"""


def _tf_installed() -> bool:
    # find_spec, not importorskip: TensorFlow is not to be imported here (module docstring)
    return importlib.util.find_spec("tensorflow") is not None


@pytest.fixture(scope="module")
def tf_files(tmp_path_factory) -> Path:
    """The folder the TensorFlow subprocess wrote (module docstring)."""
    if not _tf_installed():
        pytest.skip(NO_TF)
    work = tmp_path_factory.mktemp("tf-checkpoints")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-c", _TF_SCRIPT, str(work), tf_checkpoint.__file__]
    subprocess.run(cmd, check=True, env=env, cwd=work, timeout=300)
    return work


def _tf_says(work: Path, name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """TensorFlow's reader on checkpoint `name`: name -> its facts, and its arrays."""
    meta = json.loads((work / f"{name}.json").read_text())
    with np.load(work / f"{name}.npz") as npz:
        return meta, {k: npz[m["key"]] for k, m in meta.items() if m["key"] in npz}


def _copy(tf_files: Path, name: str, tmp_path: Path) -> Path:
    """A copy of checkpoint folder `name` to damage; returns its folder."""
    return Path(shutil.copytree(tf_files / name, tmp_path / name))


def _prefix(folder: Path) -> Path:
    return next(folder.glob("*.index")).with_suffix("")


# checkpoint -> where it is, below the subprocess's folder
WHERE = {"tf1": "tf1", "tf2": "tf2", "saved_model": "saved_model/variables"}


@pytest.mark.parametrize("name", ["tf1", "tf2", "saved_model"])
def test_tensors_are_the_ones_tensorflow_reads(tf_files, name):
    meta, arrays = _tf_says(tf_files, name)
    got = read_checkpoint(tf_files / WHERE[name])
    assert set(got) == {k for k, m in meta.items() if m["dtype"] != "string"}
    for key, want in arrays.items():
        array = got[key].view(np.uint16) if meta[key]["dtype"] == "bfloat16" else got[key]
        assert array.dtype == want.dtype and array.shape == want.shape, key
        assert np.array_equal(array, want), key
        assert got[key].flags.writeable, key  # torch.from_numpy takes it without a warning
    with_strings = read_checkpoint(tf_files / WHERE[name], strings=True)
    assert set(with_strings) == set(meta)
    for key, m in meta.items():
        if "strings" in m:
            assert with_strings[key].shape == tuple(m["shape"]), key
            assert list(with_strings[key].ravel()) == [bytes.fromhex(s) for s in m["strings"]]


def test_the_tf1_checkpoint_is_the_one_meant(tf_files):
    """Two data shards, Momentum slots, float16 and bfloat16 as TensorFlow gives them."""
    assert len(list((tf_files / "tf1").glob("*.data-*-of-00002"))) == 2
    got = read_checkpoint(tf_files / "tf1")
    assert got[WEIGHTS].shape == (3, 3, 3, 8) and f"{WEIGHTS}/Momentum" in got
    assert got["global_step"].dtype == np.int64 and got["global_step"] == 3
    assert got["extra/half"].dtype == np.float16 and str(got["extra/bfloat16"].dtype) == "bfloat16"


@pytest.mark.parametrize("name", ["tf1", "tf2", "partitioned"])
def test_list_checkpoint_gives_tensorflows_dtypes_and_shapes(tf_files, name):
    meta, _ = _tf_says(tf_files, name)
    expected = {k: (m["dtype"], tuple(m["shape"])) for k, m in meta.items()}
    assert list_checkpoint(tf_files / name) == expected  # a partitioned one whole, as TF


def test_every_way_to_name_a_checkpoint(tf_files, tmp_path):
    prefix = _prefix(tf_files / "tf1")  # model.ckpt-3
    expected = read_checkpoint(prefix).keys()
    shard, state = f"{prefix}.data-00001-of-00002", tf_files / "tf1" / "checkpoint"
    for path in (f"{prefix}.index", shard, tf_files / "tf1", state):  # state: an absolute path
        assert read_checkpoint(path).keys() == expected, path
    moved = _copy(tf_files, "tf1", tmp_path)
    (moved / "checkpoint").write_text('model_checkpoint_path: "/gone/model.ckpt-3"\n')
    assert read_checkpoint(moved).keys() == expected  # the folder's own copy
    (moved / "checkpoint").unlink()
    assert read_checkpoint(moved).keys() == expected  # its only .index
    shutil.copy(moved / "model.ckpt-3.index", moved / "model.ckpt-2.index")
    with pytest.raises(TFCheckpointError, match="pass one prefix: model.ckpt-2, model.ckpt-3"):
        read_checkpoint(moved)
    text = (tf_files / "tf2" / "checkpoint").read_text()
    assert text.startswith('model_checkpoint_path: "ckpt-1"')  # relative to its folder
    assert "save_counter/.ATTRIBUTES/VARIABLE_VALUE" in read_checkpoint(tf_files / "tf2")
    shutil.copytree(tf_files / "tf2", tmp_path / "caf\u00e9")  # as TF's text format escapes it
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "caf\\303\\251/ckpt-1"\n')
    assert read_checkpoint(tmp_path).keys() == read_checkpoint(tf_files / "tf2").keys()


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x20
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_tensor_names_the_tensor_and_file(tf_files, tmp_path):
    folder = _copy(tf_files, "tf1", tmp_path)
    _, arrays = _tf_says(tf_files, "tf1")
    shard = next(p for p in folder.glob("*.data-*") if arrays[WEIGHTS].tobytes() in p.read_bytes())
    _flip(shard, shard.read_bytes().index(arrays[WEIGHTS].tobytes()) + 37)
    with pytest.raises(TFCheckpointError, match="fails its checksum") as e:
        read_checkpoint(_prefix(folder))
    assert f"tensor {WEIGHTS!r}" in str(e.value) and str(shard) in str(e.value)
    assert list_checkpoint(_prefix(folder))[WEIGHTS] == ("float32", (3, 3, 3, 8))  # index only


def test_a_missing_data_shard_is_named(tf_files, tmp_path):
    folder = _copy(tf_files, "tf1", tmp_path)
    shard = next(folder.glob("*.data-00001-of-00002"))
    shard.unlink()
    with pytest.raises(TFCheckpointError, match="is missing: the checkpoint has 2 data shard") as e:
        read_checkpoint(_prefix(folder))
    assert str(e.value).startswith(str(shard))


@pytest.mark.parametrize("cut", [1, 47, 300])
def test_a_truncated_index_is_reported(tf_files, tmp_path, cut):
    folder = _copy(tf_files, "tf2", tmp_path)
    index = next(folder.glob("*.index"))
    index.write_bytes(index.read_bytes()[:-cut])
    with pytest.raises(TFCheckpointError, match="is cut short") as e:
        read_checkpoint(folder)
    assert str(e.value).startswith(str(index))


def test_a_truncated_data_file_names_the_tensor(tf_files, tmp_path):
    folder = _copy(tf_files, "tf1", tmp_path)
    shard = next(folder.glob("*.data-00000-of-00002"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(TFCheckpointError, match="the file is cut short") as e:
        read_checkpoint(_prefix(folder))
    assert str(shard) in str(e.value) and "tensor '" in str(e.value)


def _first_block(index: bytes) -> tuple[int, int]:
    """(offset, size) of an index file's first data block, from its footer and index block."""
    (_, _, offset, size), _ = tf_checkpoint._varints(index[-48:], 4)
    _, handle = next(tf_checkpoint._entries(index[offset : offset + size]))
    return tuple(tf_checkpoint._varints(handle, 2)[0])


def test_a_damaged_or_compressed_index_block_is_reported(tf_files, tmp_path):
    folder = _copy(tf_files, "tf2", tmp_path)
    index = next(folder.glob("*.index"))
    good = index.read_bytes()
    offset, size = _first_block(good)
    _flip(index, offset + size // 2)
    with pytest.raises(TFCheckpointError, match="block at byte 0 fails its checksum"):
        read_checkpoint(folder)
    snappy = bytearray(good)  # the type byte says snappy, and the checksum agrees
    snappy[size] = 1
    snappy[size + 1 : size + 5] = tf_checkpoint.masked_crc(snappy[: size + 1]).to_bytes(4, "little")
    index.write_bytes(bytes(snappy))
    with pytest.raises(TFCheckpointError, match=r"is compressed \(type 1\)"):
        read_checkpoint(folder)


def test_what_is_not_a_v2_checkpoint_is_said(tf_files, tmp_path):
    (tmp_path / "empty").mkdir()
    variables = tf_files / "saved_model" / "variables" / "variables"
    cases = {
        tf_files / "v1" / "model.ckpt": "is a V1 checkpoint",
        tf_files / "v1": "is a V1 checkpoint",  # its `checkpoint` file names it
        tf_files / "saved_model": f"is a SavedModel, not a checkpoint; .* {variables}: pass",
        tmp_path / "empty": "holds no TensorFlow checkpoint",
        tf_files / "tf1" / "model.ckpt": "does not exist; found model.ckpt-3.index",
        tf_files / "tf1" / "model.ckpt-3.meta": "is not a V2 checkpoint",
    }
    for path, says in cases.items():
        with pytest.raises(TFCheckpointError, match=says) as e:
            read_checkpoint(path)
        assert str(path) in str(e.value)
    not_index = tmp_path / "x.index"
    not_index.write_bytes(b"not a table" * 10)
    with pytest.raises(TFCheckpointError, match="cut short, or no checkpoint index"):
        list_checkpoint(not_index)


def test_a_partitioned_variable_is_listed_but_not_read(tf_files):
    with pytest.raises(TFCheckpointError, match="'part/w' is saved in 2 slices"):
        read_checkpoint(tf_files / "partitioned")


def test_bfloat16_widens_to_float32_without_ml_dtypes(tf_files, monkeypatch):
    _, arrays = _tf_says(tf_files, "tf1")
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # `import ml_dtypes` fails
    got = read_checkpoint(tf_files / "tf1")["extra/bfloat16"]
    bits = arrays["extra/bfloat16"]
    assert got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), bits.astype(np.uint32) << 16)


def test_reading_in_a_process_that_holds_tensorflow(tf_files):
    assert json.loads((tf_files / "in_process.json").read_text()) == []


def test_importing_and_reading_does_not_load_tensorflow(tf_files):
    code = (
        "import sys\n"
        "from segment_deeplab.models.tf_checkpoint import read_checkpoint\n"
        f"assert read_checkpoint({str(tf_files / 'tf2')!r})\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
