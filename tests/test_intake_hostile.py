"""Hostile and broken model input: every case is refused quickly, with bounded memory, as one clear line.

GGUF metadata is the amplification risk: gguf-py's stock reader builds numpy objects per array element, so a
1 MB file holding one array of 1M uint8 cost ~750 MB and ~35 s (4 MB: minutes, GBs). The files below are packed
by hand (struct) where GGUFWriter would refuse to write them or take minutes, by GGUFWriter where well formed.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig

from edgepack.errors import EdgepackError
from edgepack.fit import estimate, peek_config
from edgepack.intake import common, gguf_file, load_student
from edgepack.model import ModelConfig
from edgepack.quantize import get_preset
from tests.test_intake import SMALL, tiny_state_dict, write_bare_gguf, write_gguf

T = gguf.GGUFValueType
SIZE = 4 << 20  # the 4 MB hostile file
FIX = "convert the model again with llama.cpp's convert_hf_to_gguf.py"
HF_FIX = "restore the config.json the checkpoint came with"


def error_of(source: str) -> str:
    """The one line `load_student` refuses `source` with (and peek_config, the fit check's reader, agrees)."""
    with pytest.raises(EdgepackError) as caught:
        load_student(source)
    message = str(caught.value)
    assert "\n" not in message and message == caught.value.one_line() and caught.value.fix
    with pytest.raises(EdgepackError) as peeked:
        peek_config(source)
    assert str(peeked.value) == message
    return message


# --- GGUF files packed byte by byte --------------------------------------------------------------------------


def kv(key: str, value_type: T, payload: bytes) -> bytes:
    name = key.encode()
    return struct.pack("<Q", len(name)) + name + struct.pack("<I", value_type) + payload


def array(item_type: T, count: int, payload: bytes = b"") -> bytes:
    return struct.pack("<IQ", item_type, count) + payload


def packed_gguf(path: Path, *kvs: bytes, tensors: int = 0, keys: int | None = None, body: bytes = b"") -> Path:
    header = struct.pack("<4sIQQ", b"GGUF", 3, tensors, len(kvs) if keys is None else keys)
    path.write_bytes(header + b"".join(kvs) + body)
    return path


def tensor_info(name: str) -> bytes:
    raw = name.encode()
    return struct.pack("<Q", len(raw)) + raw + struct.pack("<IQIQ", 1, 1, gguf.GGMLQuantizationType.F32, 0)


def many_keys() -> list[bytes]:
    return [kv(f"k{i}", T.UINT8, b"\0") for i in range(SIZE // 18)]


# name -> (what the file holds, the message's text after "GGUF file PATH ")
HOSTILE: dict[str, tuple[Any, str]] = {
    "uint8-array": (
        lambda p: packed_gguf(p, kv("general.junk", T.ARRAY, array(T.UINT8, SIZE, bytes(SIZE)))),
        f"holds an array of {SIZE} items under general.junk; edgepack reads at most 65536 there; {FIX}",
    ),
    "int32-array-of-a-tokenizer-key-with-the-wrong-type": (
        lambda p: packed_gguf(p, kv("tokenizer.ggml.scores", T.ARRAY, array(T.INT32, SIZE // 4, bytes(SIZE)))),
        f"stores tokenizer.ggml.scores as an array of INT32, where llama.cpp writes FLOAT32; {FIX}",
    ),
    "merges-beyond-any-vocabulary": (
        lambda p: packed_gguf(p, kv("tokenizer.ggml.merges", T.ARRAY, array(T.STRING, 600_000, bytes(SIZE)))),
        f"holds an array of 600000 items under tokenizer.ggml.merges; edgepack reads at most 524288 there; {FIX}",
    ),
    "array-of-arrays": (
        lambda p: packed_gguf(p, kv("general.junk", T.ARRAY, array(T.ARRAY, 1, array(T.UINT8, SIZE, bytes(SIZE))))),
        f"holds an array of arrays under general.junk, which no model file has; {FIX}",
    ),
    "array-of-2**63-items": (
        lambda p: packed_gguf(p, kv("general.junk", T.ARRAY, array(T.UINT8, 1 << 63)), body=bytes(SIZE)),
        f"holds an array of {1 << 63} items under general.junk; edgepack reads at most 65536 there; {FIX}",
    ),
    "200k-metadata-keys": (
        lambda p: packed_gguf(p, *many_keys()),
        f"declares {SIZE // 18} metadata keys; a model file has a few dozen (at most 4096); {FIX}",
    ),
    "100k-tensors": (
        lambda p: packed_gguf(p, tensors=SIZE // 38, body=b"".join(tensor_info(f"t{i}") for i in range(SIZE // 38))),
        f"declares {SIZE // 38} tensors; a Llama or Qwen2 model of 1000 layers has 12,004 (at most 16384); {FIX}",
    ),
    # Within every limit: 500,000 empty token strings are read as one view, then the file is refused plainly.
    "500k-token-strings": (
        lambda p: packed_gguf(p, kv("tokenizer.ggml.tokens", T.ARRAY, array(T.STRING, 500_000, bytes(8 * 500_000)))),
        f"does not name its architecture; {FIX}",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_gguf_metadata_is_refused(tmp_path: Path, case: str) -> None:
    write, expected = HOSTILE[case]
    path = write(tmp_path / f"{case}.gguf")
    assert path.stat().st_size >= SIZE * 0.95
    assert error_of(str(path)) == f"GGUF file {path} {expected}"


def test_gguf_string_claiming_2_62_bytes_is_truncated(tmp_path: Path) -> None:
    path = packed_gguf(tmp_path / "long.gguf", kv("general.name", T.STRING, struct.pack("<Q", 1 << 62) + b"x"))
    assert error_of(str(path)) == (
        f"GGUF file {path} is truncated (it needs {56 + (1 << 62)} bytes but the file has 57); download it again"
    )


RSS_PROBE = textwrap.dedent(
    """
    import json, sys, threading
    import psutil
    from edgepack.errors import EdgepackError
    from edgepack.intake import load_student

    process, done, peak = psutil.Process(), threading.Event(), [0]

    def sample():  # the peak of resident memory while the files are read (ru_maxrss would include imports)
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            done.wait(0.002)

    before = process.memory_info().rss
    sampler = threading.Thread(target=sample)
    sampler.start()
    refused = []
    for path in sys.argv[1:]:
        try:
            load_student(path)
        except EdgepackError as err:
            refused.append(str(err))
    done.set()
    sampler.join()
    print(json.dumps({"growth_mb": (max(peak[0], process.memory_info().rss) - before) / 1e6, "refused": refused}))
    """
)


def rss_growth_mb(paths: list[str], probe: str = RSS_PROBE) -> dict[str, Any]:
    run = subprocess.run([sys.executable, "-c", probe, *paths], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_hostile_gguf_files_cost_bounded_memory(tmp_path: Path) -> None:
    """All the 4 MB hostile files in one fresh process: resident memory grows by a few MB (measured: 4), where
    the stock reader needed ~750 MB for a 1 MB file of one uint8 array."""
    paths = [str(write(tmp_path / f"{case}.gguf")) for case, (write, _) in HOSTILE.items()]
    report = rss_growth_mb(paths)
    assert len(report["refused"]) == len(paths)
    assert report["growth_mb"] < 200, report


def test_the_memory_probe_sees_the_stock_readers_amplification(tmp_path: Path) -> None:
    """The probe above can fail: gguf-py's own reader on a 100 KB array of uint8 (~70 MB measured)."""
    path = packed_gguf(tmp_path / "small.gguf", kv("general.junk", T.ARRAY, array(T.UINT8, 100_000, bytes(100_000))))
    stock = RSS_PROBE.replace("from edgepack.intake import load_student", "from gguf import GGUFReader as load_student")
    assert rss_growth_mb([str(path)], stock)["growth_mb"] > 30


# --- GGUF hyper-parameters -----------------------------------------------------------------------------------


def bare_gguf(path: Path, **metadata: Any) -> Path:
    """One embedding tensor (8 x 4) and the given `llama.*` metadata over a small valid base."""
    base = {"embedding_length": 4, "block_count": 2, "feed_forward_length": 8, "attention.head_count": 2}
    return write_bare_gguf(path, "llama", **{**base, **metadata})


@pytest.mark.parametrize(
    "metadata, expected",
    [
        ({"attention.head_count": 0}, "has llama.attention.head_count = 0, not a positive whole number"),
        ({"embedding_length": 6, "attention.head_count": 4},
         "has llama.attention.head_count = 4, which does not divide llama.embedding_length = 6"),
        ({"attention.head_count_kv": 3, "attention.head_count": 4, "embedding_length": 8},
         "has llama.attention.head_count_kv = 3, which does not divide llama.attention.head_count = 4"),
        ({"block_count": 5000},
         "has llama.block_count = 5000, more than any model edgepack can export has (at most 1000)"),
        ({"context_length": 0}, "has llama.context_length = 0, not a positive whole number"),
        ({"rope.freq_base": math.nan}, "has llama.rope.freq_base = nan, not a finite positive number"),
        ({"rope.freq_base": "lots"}, "has llama.rope.freq_base = 'lots', not a number"),
        ({"attention.key_length": 3, "rope.dimension_count": 3},
         "has llama.attention.key_length = 3, not even (RoPE rotates pairs of channels)"),
    ],
    ids=["heads-0", "heads-not-dividing-hidden", "kv-not-dividing-heads", "layers-5000", "context-0",
         "theta-nan", "theta-string", "head-dim-odd"],
)
def test_gguf_hyper_parameters_are_validated(tmp_path: Path, metadata: dict[str, Any], expected: str) -> None:
    path = bare_gguf(tmp_path / "bad.gguf", **metadata)
    assert error_of(str(path)) == f"GGUF file {path} {expected}; {FIX}"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete, loadable llama GGUF (2 layers, 300 tokens, ~330 KB)."""
    cfg = LlamaConfig(**SMALL, tie_word_embeddings=True)
    return write_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", "llama", cfg, tiny_state_dict(cfg))


def patched_uint32(source: Path, target: Path, key: str, value: int) -> Path:
    """A copy of `source` with the uint32 metadata `key` set to `value`."""
    data = bytearray(source.read_bytes())
    at = data.index(key.encode()) + len(key) + 4  # past the key and its value type
    data[at : at + 4] = struct.pack("<I", value)
    target.write_bytes(bytes(data))
    return target


def test_gguf_special_token_outside_the_vocabulary(tmp_path: Path, tiny_gguf: Path) -> None:
    path = patched_uint32(tiny_gguf, tmp_path / "bos.gguf", "tokenizer.ggml.bos_token_id", 10**6)
    with pytest.raises(EdgepackError) as caught:
        load_student(str(path))
    assert str(caught.value) == (
        f"GGUF file {path}: tokenizer.ggml.bos_token_id = 1000000 is not a token id (0 to 299); "
        "pass the tokenizer files that came with these weights"
    )


@pytest.mark.parametrize(
    "write, expected",
    [
        (lambda w: w.add_token_scores([0.0, 0.0]), " has 2 tokenizer.ggml.scores for 3 tokens; " + FIX),
        (lambda w: w.add_string("tokenizer.ggml.eos_token_id", "x"),
         ": tokenizer.ggml.eos_token_id = 'x' is not a token id (0 to 2); "
         "pass the tokenizer files that came with these weights"),
        (lambda w: w.add_uint8("tokenizer.ggml.add_bos_token", 1),
         " has tokenizer.ggml.add_bos_token = 1, not true or false; " + FIX),
        (lambda w: w.add_uint32("tokenizer.chat_template", 7),
         " has tokenizer.chat_template = 7, not a string; " + FIX),
    ],
    ids=["scores-count", "eos-as-text", "add-bos-as-number", "template-as-number"],
)
def test_gguf_tokenizer_metadata_is_validated(tmp_path: Path, write: Any, expected: str) -> None:
    """What load_gguf checks, before converting the vocabulary, of a three-token GGUF vocabulary."""
    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list(["a", "b", "c"])
    write(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    reader = gguf_file.open_gguf(path)
    with pytest.raises(EdgepackError) as caught:
        gguf_file.gguf_tokenizer(path, gguf_file.Metadata(reader, path))
    assert str(caught.value) == f"GGUF file {path}{expected}"


def test_tiny_gguf_still_loads(tiny_gguf: Path) -> None:
    """The fuzz seed is valid: what the mutations below start from loads completely."""
    student = load_student(str(tiny_gguf))
    assert student.config.vocab_size == 300 and student.bos_id == 1 and student.eos_ids == [2]


# --- config.json -----------------------------------------------------------------------------------------------

BASE = LlamaConfig(**SMALL).to_dict()


def config_folder(folder: Path, text: str) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(text)
    return folder


CONFIG_CASES = {
    "not-json": ("{not json", "is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 "
                 "(char 1)); restore the original file"),
    "a-list": ("[1, 2]", "holds an array, not a JSON object; restore the original file"),
    "nested-too-deeply": ("[" * 100_000 + "]" * 100_000,
                          "is not valid JSON (nested too deeply); restore the original file"),
}
FIELD_CASES = {
    "heads-0": ({"num_attention_heads": 0}, "num_attention_heads = 0, not a positive whole number"),
    "hidden-negative": ({"hidden_size": -64}, "hidden_size = -64, not a positive whole number"),
    "hidden-string": ({"hidden_size": "64"}, "hidden_size = '64' (a string), not a positive whole number"),
    "theta-nan": ({"rope_theta": math.nan}, "rope_theta = nan, not a finite positive number"),
    "heads-not-dividing-hidden": ({"num_attention_heads": 5},
                                  "num_attention_heads = 5, which does not divide hidden_size = 64"),
    "kv-not-dividing-heads": ({"num_key_value_heads": 3},
                              "num_key_value_heads = 3, which does not divide num_attention_heads = 4"),
    "vocab-0": ({"vocab_size": 0}, "vocab_size = 0, not a positive whole number"),
    "vocab-negative": ({"vocab_size": -5}, "vocab_size = -5, not a positive whole number"),
    "layers-5000": ({"num_hidden_layers": 5000},
                    "num_hidden_layers = 5000, more than any model edgepack can export has (at most 1000)"),
    "context-0": ({"max_position_embeddings": 0}, "max_position_embeddings = 0, not a positive whole number"),
    "context-negative": ({"max_position_embeddings": -1}, "max_position_embeddings = -1, not a positive whole number"),
    "eps-0": ({"rms_norm_eps": 0}, "rms_norm_eps = 0, not a finite positive number"),
    "tied-as-text": ({"tie_word_embeddings": "yes"}, "tie_word_embeddings = 'yes' (a string), not true or false"),
    "rope-scaling-text": ({"rope_scaling": "llama3"}, "rope_scaling = 'llama3' (a string), not a JSON object"),
    "llama3-factor-nan": ({"rope_scaling": {"rope_type": "llama3", "factor": math.nan,
                                            "original_max_position_embeddings": 8192}},
                          "rope_scaling.factor = nan, not a finite positive number"),
    "head-dim-odd": ({"head_dim": 15}, "head_dim = 15, not even (RoPE rotates pairs of channels)"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_json_that_is_no_object(tmp_path: Path, case: str) -> None:
    text, expected = CONFIG_CASES[case]
    folder = config_folder(tmp_path / "m", text)
    assert error_of(str(folder)) == f"{folder / 'config.json'} {expected}"


@pytest.mark.parametrize("case", list(FIELD_CASES))
def test_config_json_values_are_validated(tmp_path: Path, case: str) -> None:
    change, expected = FIELD_CASES[case]
    folder = config_folder(tmp_path / "m", json.dumps({**BASE, "rope_scaling": None, **change}))
    assert error_of(str(folder)) == f"config.json in {folder} has {expected}; {HF_FIX}"


def test_model_config_built_directly_is_validated() -> None:
    """A bundle manifest's config goes straight to ModelConfig(**...): the same checks, field names as they are."""
    fields = ModelConfig.from_hf(BASE).to_dict()
    with pytest.raises(EdgepackError) as caught:
        ModelConfig(**{**fields, "hidden_size": -64})
    assert str(caught.value) == (
        "the model config has hidden_size = -64, not a positive whole number; use the config the checkpoint came with"
    )


# --- the CLI: one line, exit 1, refused while planning (before any weight is read or lowered) --------------


@pytest.mark.parametrize("case", ["hidden-negative", "uint8-array"])
def test_cli_export_refuses_in_one_line(tmp_path: Path, case: str) -> None:
    if case in FIELD_CASES:
        source = config_folder(tmp_path / "m", json.dumps({**BASE, **FIELD_CASES[case][0]}))
        expected = f"config.json in {source} has {FIELD_CASES[case][1]}; {HF_FIX}"
    else:
        write, tail = HOSTILE[case]
        source = write(tmp_path / "hostile.gguf")
        expected = f"GGUF file {source} {tail}"
    out = tmp_path / "bundle"
    run = subprocess.run(
        [str(Path(sys.executable).parent / "edgepack"), "export", "-m", str(source), "--no-verify", "-o", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 1
    assert run.stderr.splitlines() == [f"error: {expected}"], run.stderr[-2000:]
    assert "Traceback" not in run.stdout + run.stderr and "weights -" not in run.stdout + run.stderr
    assert not out.exists()


# --- fuzzing: only EdgepackError comes out ---------------------------------------------------------------------

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


def only_edgepack_errors(path: Path) -> None:
    try:
        load_student(str(path))
    except EdgepackError as err:
        assert "\n" not in str(err)


@FUZZ
@given(
    version=st.sampled_from([2, 3]),
    counts=st.one_of(st.none(), st.tuples(st.integers(0, 4), st.integers(0, 6))),
    body=st.binary(max_size=600),
)
def test_fuzz_random_bytes_after_the_gguf_header(
    tmp_path_factory: pytest.TempPathFactory, version: int, counts: tuple[int, int] | None, body: bytes
) -> None:
    """Random bytes after magic + version; sometimes small tensor/key counts first, so parsing goes deeper."""
    head = struct.pack("<4sI", b"GGUF", version) + (struct.pack("<QQ", *counts) if counts else b"")
    path = tmp_path_factory.mktemp("fuzz") / "random.gguf"
    path.write_bytes(head + body)
    only_edgepack_errors(path)


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_and_truncated_gguf(tiny_gguf: Path, data: st.DataObject) -> None:
    """Bytes of a valid GGUF overwritten (mostly in its header, metadata and tensor table) and/or cut short."""
    original = tiny_gguf.read_bytes()
    metadata_end = gguf_file.open_gguf(tiny_gguf).data_offset
    mutated = bytearray(original)
    edits = data.draw(st.lists(st.tuples(st.integers(0, metadata_end - 1), st.binary(min_size=1, max_size=8)),
                               max_size=6))
    for at, new in edits:
        mutated[at : at + len(new)] = new
    if data.draw(st.booleans()):
        mutated = mutated[: data.draw(st.integers(0, len(mutated)))]
    path = tiny_gguf.parent / "mutated.gguf"
    path.write_bytes(bytes(mutated))
    only_edgepack_errors(path)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
CONFIG_KEYS = ["architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps",
               "tie_word_embeddings", "attention_bias", "max_position_embeddings", "rope_scaling", "rope_parameters"]
SMALL_WHOLE = st.integers(-4, 5000)


@FUZZ
@given(
    changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), st.one_of(JSON, SMALL_WHOLE), max_size=5),
    removed=st.sets(st.sampled_from(CONFIG_KEYS), max_size=2),
)
def test_fuzz_config_json(changes: dict[str, Any], removed: set[str]) -> None:
    """config.json dicts with keys replaced by any JSON value or dropped: a config, or one EdgepackError line.
    An accepted config gives sane fit figures (every part of the estimate positive)."""
    config = {k: v for k, v in {**BASE, **changes}.items() if k not in removed}
    try:
        cfg = common.config_from_hf(config, "config.json")
    except EdgepackError as err:
        assert "\n" not in str(err)
        return
    figures = estimate(cfg, get_preset("int4"), 256)
    assert min(figures.weights.values()) > 0 and figures.kv_cache > 0 and figures.activations > 0


@settings(max_examples=60, deadline=None, database=None)
@given(text=st.text(max_size=80) | st.sampled_from(["", "null", "1", '"x"', "{}", '{"architectures": 1}']))
def test_fuzz_config_json_text(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    folder = config_folder(tmp_path_factory.mktemp("cfg") / "m", text)
    try:
        peek_config(str(folder))
    except EdgepackError as err:
        assert "\n" not in str(err)
