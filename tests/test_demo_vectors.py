"""Golden vectors for the demo apps' bundle libraries (android_demo/bundlekit in Java, ios_demo's
EdgepackBundleKit in Swift), written to build/app-vectors/ (git-ignored), where `.ci/run` runs the JVM tests
after pytest (android_demo/bundlekit/test.sh).

What is written: a tiny real bundle (the project's ONNX exporter over the default model's tokenizer), hostile
copies of it that must be refused, and `vectors.json` with the expected results of chat formatting, streaming
UTF-8 decoding, stop handling and think splitting. Every expected value comes from edgepack's own runtime
(`runtime.load(...).prompt_ids`, `IncrementalDetokenizer`, `StopStringMatcher`, `ThinkSplitter`,
`Session.complete`), and the tests below check the vectors against it and against hand-written expectations,
so the apps mirror the Python runtime, not a copy of a copy.

vectors.json (format 1), paths relative to its folder:
- bundle: the good bundle's folder; vocab_digest: sha256 over every id's decoded bytes (4-byte big-endian
  length + bytes, ids 0..vocab-1, special tokens empty), so an app's byte-level vocabulary is checked whole.
- refused: [{name, folder, reason}]: each copy must be refused, the message containing `reason`.
- chat_formats: {name: manifest `tokenizer.chat_format` section}; "bundle" is the bundle's own.
- chat: [{format, messages, add_generation_prompt, prompt, inside_think}] or {format, messages, error}.
- streaming: [{name, ids, pieces_hex, emitted, text}]: each token's bytes and the text a UTF-8 stream decoder
  emits after each piece (a character split across pieces is held back).
- think: [{name, tags, inside, feeds, chunks}]: text fed piece by piece -> [kind, text] chunks in order.
- stop: [{name, pieces, stop_strings, stop_texts, text, stop_reason}]: runner text pieces (ExecuTorch's
  runner passes the end token's text before it stops) -> the text shown.
- replies: [{name, ids, stop_strings, inside_think, chunks, stop_reason}]: generated ids (an end id ends
  the reply) through decode -> stop strings -> think split, as runtime/session.py streams them; `chunks` are
  runs (adjacent chunks of one kind joined).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from edgepack import runtime
from edgepack.bundle import read_manifest
from edgepack.chat_format import apply_chat_format, derive_chat_format
from edgepack.errors import EdgepackError
from edgepack.export import plan_export, run_export
from edgepack.runtime.session import StopStringMatcher, ThinkSplitter
from edgepack.runtime.tokenizer import BundleTokenizer

from conftest import random_model, tiny_config, write_student_folder

VECTORS = Path(__file__).resolve().parents[1] / "build" / "app-vectors"
TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
CONTEXT = 256
MULTILINGUAL = "Paris — the capital. 東京 is Tokyo; 🙂 naïve café, Привет! مرحبا"
CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  2+2?  "}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one?"}],
    [{"role": "system", "content": "Réponds en français."}, {"role": "user", "content": "東京 🙂?"},
     {"role": "assistant", "content": "<think>\nTokyo\n</think>\n\nC'est Tokyo."},
     {"role": "user", "content": "\nline one\nline two\n"}],
]


def _write_json(path: Path, data: Any) -> None:
    _replace(path, (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def _replace(path: Path, data: bytes) -> None:
    """A new file at `path` (the copies share the bundle's files as hard links: never write through one)."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)


# --- the bundle ----------------------------------------------------------------------------------------------


def _student(folder: Path, default_student) -> Path:
    """A tiny Llama over SmolLM2's vocabulary (as in test_app_runtimes.py): an output layer that picks tokens
    of printable text and an end-of-turn row that wins within a few steps, so replies end on EOS."""
    from tokenizers import Tokenizer

    cfg = tiny_config(vocab_size=default_student.config.vocab_size, max_position_embeddings=1024,
                      tie_word_embeddings=False)
    model = random_model(cfg, max_context=CONTEXT)
    tok = Tokenizer.from_str(default_student.tokenizer_files["tokenizer.json"].decode())
    texts = [tok.decode([i], skip_special_tokens=False) for i in range(cfg.vocab_size)]
    printable = torch.tensor([bool(t) and t.isprintable() and "<|" not in t for t in texts])
    eos = default_student.eos_ids[0]
    with torch.no_grad():
        head = model.lm_head.weight
        head[~printable] = 0.0
        rows = head[printable]
        head[eos] = 3.0 * rows.mean(0) / rows.mean(0).norm() * rows.norm(dim=1).mean()
    return write_student_folder(folder, default_student, cfg, model)


def _refused_copies(bundle: Path, out: Path) -> list[dict[str, str]]:
    """Copies of the bundle an app must refuse, each with a word its message (and edgepack's) contains."""
    outside = out / "outside.txt"
    outside.write_text("not part of any bundle\n")
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    cases: list[dict[str, str]] = []

    def copy(name: str, reason: str) -> Path:
        folder = out / name
        shutil.copytree(bundle, folder, symlinks=True, copy_function=os.link)  # 25 MB model: linked, not copied
        cases.append({"name": name, "folder": f"refused/{name}", "reason": reason})
        return folder

    def edit_manifest(folder: Path, change) -> None:
        manifest = json.loads((folder / "manifest.json").read_text())
        change(manifest)
        _write_json(folder / "manifest.json", manifest)

    tampered = copy("tampered", "checksum") / "tokenizer.json"
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one byte: same size, another sha256
    _replace(tampered, bytes(data))
    truncated = copy("truncated", "checksum") / "tokenizer_config.json"
    _replace(truncated, truncated.read_bytes()[:-1])
    (copy("missing_file", "missing") / "chat_template.jinja").unlink()
    link = copy("symlink", "symbolic link") / "chat_template.jinja"
    shutil.copy(link, out / "outside_template.jinja")
    link.unlink()
    link.symlink_to(out / "outside_template.jinja")
    edit_manifest(copy("dotdot_path", "plain relative path"),
                  lambda m: m["files"].update({"../outside.txt": {"size": outside.stat().st_size, "sha256": digest}}))
    edit_manifest(copy("absolute_path", "absolute path"),
                  lambda m: m["files"].update({str(outside): {"size": outside.stat().st_size, "sha256": digest}}))
    edit_manifest(copy("newer_format", "format version"), lambda m: m.update(format_version=2))
    edit_manifest(copy("not_edgepack", "not an edgepack"), lambda m: m.update(format="something-else"))
    _replace(copy("unlisted_file", "not listed") / "extra.bin", b"\0")
    return cases


# --- expected values, from the runtime's own classes ----------------------------------------------------------


def _byte_pieces(tokenizer_json: dict[str, Any]) -> list[bytes]:
    """Each id's bytes as a byte-level BPE decoder gives them (special tokens empty, as when streaming):
    the GPT-2 byte<->character table inverted; a token with a character outside it is its own UTF-8."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    inverse = {c: b for b, c in bytes_to_unicode().items()}
    vocab: dict[int, str] = {i: t for t, i in tokenizer_json["model"]["vocab"].items()}
    special = set()
    for added in tokenizer_json["added_tokens"]:
        vocab[added["id"]] = added["content"]
        if added["special"]:
            special.add(added["id"])
    size = max(vocab) + 1
    pieces = []
    for i in range(size):
        text = vocab.get(i, "")
        if i in special:
            pieces.append(b"")
        elif all(c in inverse for c in text):
            pieces.append(bytes(inverse[c] for c in text))
        else:
            pieces.append(text.encode("utf-8"))
    return pieces


def _vocab_digest(pieces: list[bytes]) -> str:
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(len(piece).to_bytes(4, "big") + piece)
    return digest.hexdigest()


def _utf8_emitted(pieces: list[bytes]) -> list[str]:
    """What a UTF-8 stream decoder emits after each piece, the last entry being what the final flush adds."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    return [decoder.decode(p) for p in pieces] + [decoder.decode(b"", final=True)]


def _think(tags: tuple[str, str], inside: bool, feeds: list[str]) -> list[list[str]]:
    splitter = ThinkSplitter(*tags, inside=inside)
    chunks = [c for feed in feeds for c in splitter.feed(feed)] + splitter.flush()
    return [[c.kind, c.text] for c in chunks]


def _stop_case(pieces: list[str], stops: list[str], stop_texts: list[str]) -> tuple[str, str | None]:
    """Runner text pieces: a piece that is an end token's text ends the reply, stop strings cut it."""
    matcher, out, reason = StopStringMatcher(stops), [], None
    for piece in pieces:
        if piece in stop_texts:
            reason = "eos"
            break
        out.append(matcher.feed(piece))
        if matcher.stopped:
            return "".join(out), "stop_string"
    return "".join(out) + matcher.flush(), reason


def _reply(tokenizer: BundleTokenizer, ids: list[int], stops: list[str], inside: bool,
           tags: tuple[str, str]) -> tuple[list[list[str]], str | None]:
    """Session._stream's text path over given ids: decode -> stop strings -> think split."""
    detok = tokenizer.detokenizer()
    matcher = StopStringMatcher(stops)
    splitter = ThinkSplitter(*tags, inside=inside)
    chunks, reason = [], None
    for token in ids:
        if token in tokenizer.end_ids:
            reason = "eos"
            break
        chunks += splitter.feed(matcher.feed(detok.push(token)))
        if matcher.stopped:
            reason = "stop_string"
            break
    if not matcher.stopped:
        tail = matcher.feed(detok.flush())
        reason = "stop_string" if matcher.stopped else reason
        chunks += splitter.feed(tail + matcher.flush())
    chunks += splitter.flush()
    return _runs([[c.kind, c.text] for c in chunks]), reason


def _runs(chunks: list[list[str]]) -> list[list[str]]:
    """Adjacent chunks of one kind joined: where a reply's text breaks between chunks depends on how long a
    decoder holds a partial character back (the runtime holds the whole token, a byte decoder only its bytes)."""
    runs: list[list[str]] = []
    for kind, text in chunks:
        if runs and runs[-1][0] == kind:
            runs[-1][1] += text
        else:
            runs.append([kind, text])
    return runs


def _joined(chunks: list[list[str]], kind: str) -> str:
    return "".join(text for k, text in chunks if k == kind)


# --- writing build/app-vectors ----------------------------------------------------------------------------------


def _chat_cases(tokenizer: BundleTokenizer, manifest: dict[str, Any],
                think_start: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The bundle's chat format and three more families' (derived from their templates as the exporter does),
    an inexpressible one, and every conversation rendered by the runtime's Jinja renderer."""
    formats = {"bundle": manifest["tokenizer"]["chat_format"]}
    renderers = {"bundle": tokenizer.render_chat}
    families = [("qwen2 chatml", "qwen2_chatml.jinja", "", "<|im_end|>"),
                ("llama3", "llama3.jinja", "<|begin_of_text|>", "<|eot_id|>"),
                ("r1 distill", "r1_distill.jinja", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>")]
    for name, file, bos, eos in families:
        other = BundleTokenizer(None, config={"bos_token": bos, "eos_token": eos},
                                chat_template=(TEMPLATES / file).read_text())
        renderers[name] = other.render_chat
        formats[name] = derive_chat_format(other.render_chat)
    formats["position-dependent"] = derive_chat_format(BundleTokenizer(
        None, chat_template="{% for m in messages %}[{{ loop.index }}]{{ m.content }}{% endfor %}").render_chat)
    chat: list[dict[str, Any]] = []
    for name, render in renderers.items():
        for messages in CONVERSATIONS:
            for generation in (True, False):
                prompt = render(messages, generation)
                chat.append({"format": name, "messages": messages, "add_generation_prompt": generation,
                             "prompt": prompt, "inside_think": prompt.rstrip().endswith(think_start)})
    chat.append({"format": "position-dependent", "messages": CONVERSATIONS[0], "error": "cannot be applied"})
    return formats, chat


def _streaming_cases(tokenizer: BundleTokenizer, pieces: list[bytes]) -> list[dict[str, Any]]:
    special_ids = tokenizer.tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False).ids
    cases = []
    for name, ids in [("multilingual", tokenizer.encode(MULTILINGUAL, add_special=False)),
                      ("special token skipped", tokenizer.encode("Hi ", add_special=False) + special_ids
                       + tokenizer.encode("東京", add_special=False))]:
        cases.append({"name": name, "ids": ids, "pieces_hex": [pieces[i].hex() for i in ids],
                      "emitted": _utf8_emitted([pieces[i] for i in ids]), "text": tokenizer.decode(ids)})
    invalid = [b"ok ", b"\xff", b" \xe6\x9d", b"\xb1\xe4\xba\xac", b" \xf0\x9f"]  # a bad byte, a cut-off emoji
    cases.append({"name": "invalid and truncated bytes", "ids": None, "pieces_hex": [p.hex() for p in invalid],
                  "emitted": _utf8_emitted(invalid), "text": b"".join(invalid).decode("utf-8", "replace")})
    return cases


def _think_cases(tags: tuple[str, str]) -> list[dict[str, Any]]:
    inputs = [
        ("tags whole", False, ["<think>\nplan it\n</think>\n\nThe answer is 42"]),
        ("tags split across pieces", False, ["<th", "ink>", "\n", "plan ", "it</", "thi", "nk", ">", "\n\n42"]),
        ("prompt ends inside think", True, ["\n  plan", " it", "</think>", "42"]),
        ("no tags", False, ["<thin", "g> is not a tag, ", "4", "2"]),
        ("unicode whitespace after tag", False, ["<think>\u00a0\u2003plan</think>\u3000\n42"]),
        ("unclosed think", False, ["<think>plan", " and more"]),
    ]
    return [{"name": n, "tags": list(tags), "inside": inside, "feeds": feeds, "chunks": _think(tags, inside, feeds)}
            for n, inside, feeds in inputs]


def _stop_cases(stop_texts: list[str]) -> list[dict[str, Any]]:
    inputs = [
        ("end token text ends the reply", ["Hello", " there", stop_texts[0]], []),
        ("stop string split across pieces", ["one\n", "\ntwo"], ["\n\n"]),
        ("stop string not completed", ["a\n", "b"], ["\n\n"]),
        ("earliest of two stop strings", ["x END y STOP z"], ["STOP", "END"]),
        ("stop string inside one piece", ["Paris. User: hi"], ["User:"]),
    ]
    cases = []
    for name, runner_pieces, stops in inputs:
        text, reason = _stop_case(runner_pieces, stops, stop_texts)
        cases.append({"name": name, "pieces": runner_pieces, "stop_strings": stops, "stop_texts": stop_texts,
                      "text": text, "stop_reason": reason})
    return cases


def _reply_cases(session: runtime.Session) -> list[dict[str, Any]]:
    """Two replies the bundle generated (the runtime's own text and stop reason kept beside them) and a
    synthetic one with thinking, non-ASCII text and an end id followed by more ids."""
    tokenizer, tags, end = session.tokenizer, session.think_tags, session.tokenizer.eos_ids[0]
    prompt = "What is the capital of France?"
    generated = session.complete(prompt, max_new_tokens=48)
    stop_word = generated.text[len(generated.text) // 2:][:3]
    stopped = session.complete(prompt, max_new_tokens=48, stop=[stop_word])
    thought = tokenizer.encode("<think>\nUse the map.\n</think>\n\nIt is 東京 🙂.", add_special=False) + [end, 42]
    cases = []
    for name, ids, stops, result in [
        ("generated by the bundle", generated.token_ids + ([end] if generated.stats.stop_reason == "eos" else []),
         [], generated),
        ("generated, cut by a stop string", generated.token_ids, [stop_word], stopped),
        ("thinking then answer, end id", thought, [], None),
    ]:
        chunks, reason = _reply(tokenizer, ids, stops, False, tags)
        case = {"name": name, "ids": ids, "stop_strings": stops, "inside_think": False, "chunks": chunks,
                "stop_reason": reason}
        if result is not None:
            case["runtime"] = {"text": result.text, "stop_reason": result.stats.stop_reason}
        cases.append(case)
    return cases


@pytest.fixture(scope="module")
def app_vectors(tmp_path_factory, default_student) -> dict[str, Any]:
    shutil.rmtree(VECTORS, ignore_errors=True)
    VECTORS.mkdir(parents=True)
    student = _student(tmp_path_factory.mktemp("demo") / "student", default_student)
    bundle = VECTORS / "bundle"
    run_export(plan_export(str(student), "host", quant="fp32", max_context=CONTEXT, output=bundle,
                           backend="onnx/cpu", verify=False))
    session = runtime.load(bundle)
    pieces = _byte_pieces(json.loads((bundle / "tokenizer.json").read_text(encoding="utf-8")))
    formats, chat = _chat_cases(session.tokenizer, session.manifest, session.think_tags[0])
    (VECTORS / "refused").mkdir()
    vectors = {
        "format": 1,
        "bundle": "bundle",
        "vocab_size": len(pieces),
        "vocab_digest": _vocab_digest(pieces),
        "refused": _refused_copies(bundle, VECTORS / "refused"),
        "chat_formats": formats,
        "chat": chat,
        "streaming": _streaming_cases(session.tokenizer, pieces),
        "think": _think_cases(session.think_tags),
        "stop": _stop_cases(session.manifest["tokenizer"]["stop_texts"]),
        "replies": _reply_cases(session),
    }
    _write_json(VECTORS / "vectors.json", vectors)
    return {"vectors": vectors, "session": session, "pieces": pieces}


# --- the vectors agree with the runtime ---------------------------------------------------------------------------


def test_vectors_are_written_where_the_app_tests_read_them(app_vectors):
    assert json.loads((VECTORS / "vectors.json").read_text(encoding="utf-8")) == app_vectors["vectors"]
    assert VECTORS.relative_to(Path(__file__).resolve().parents[1]).parts[0] == "build"  # git-ignored


def test_the_bundle_loads_and_every_hostile_copy_is_refused(app_vectors):
    read_manifest(VECTORS / "bundle")
    cases = app_vectors["vectors"]["refused"]
    assert len(cases) == 9
    for case in cases:
        with pytest.raises(EdgepackError) as error:
            read_manifest(VECTORS / case["folder"])
        assert case["reason"] in str(error.value), (case, str(error.value))
    assert os.path.islink(VECTORS / "refused" / "symlink" / "chat_template.jinja")
    read_manifest(VECTORS / "bundle")  # the copies' edits did not reach the bundle through a hard link


def test_chat_format_data_rebuilds_the_runtime_prompt(app_vectors):
    vectors, session = app_vectors["vectors"], app_vectors["session"]
    formats = vectors["chat_formats"]
    assert formats["bundle"] == session.manifest["tokenizer"]["chat_format"]
    assert formats["position-dependent"]["expressible"] is False
    cases = [c for c in vectors["chat"] if "prompt" in c]
    for case in cases:
        assert apply_chat_format(formats[case["format"]], case["messages"], case["add_generation_prompt"]) \
            == case["prompt"], case
        if case["format"] == "bundle" and case["add_generation_prompt"]:
            assert session.prompt_ids(case["messages"])[0] == case["prompt"]
    assert len(cases) == 4 * len(CONVERSATIONS) * 2
    # Each of the format's features is exercised by some case.
    assert formats["qwen2 chatml"]["default_system"] and formats["llama3"]["trim_content"]
    assert formats["r1 distill"]["drop_thinking"] and any(c["inside_think"] for c in cases)


def test_streaming_pieces_decode_as_the_runtime_streams(app_vectors):
    session, pieces = app_vectors["session"], app_vectors["pieces"]
    tokenizer = session.tokenizer
    for i in range(len(pieces)):  # the byte table is the tokenizer's own decoding, id by id
        text = pieces[i].decode("utf-8", "replace")
        if "\ufffd" not in text:
            assert tokenizer.decode([i]) == text, i
    for case in app_vectors["vectors"]["streaming"]:
        if case["ids"] is None:
            continue
        # The runtime holds a whole token back while it ends in a partial character; a byte decoder holds only
        # the partial character's bytes: at every step the runtime has shown a prefix of what the vector shows.
        detok = tokenizer.detokenizer()
        shown_by_runtime, shown_by_vector = "", ""
        for token, emitted in zip(case["ids"], case["emitted"]):
            shown_by_runtime += detok.push(token)
            shown_by_vector += emitted
            assert shown_by_vector.startswith(shown_by_runtime), case["name"]
        assert shown_by_runtime + detok.flush() == shown_by_vector + case["emitted"][-1] == case["text"]
        assert case["text"] == tokenizer.decode(case["ids"])
    multilingual = app_vectors["vectors"]["streaming"][0]
    assert multilingual["text"] == MULTILINGUAL
    assert "" in multilingual["emitted"][:-1]  # some character arrived split across tokens and was held back


def test_think_and_stop_vectors_hold_the_expected_text(app_vectors):
    think = {c["name"]: c for c in app_vectors["vectors"]["think"]}
    for name in ("tags whole", "tags split across pieces", "prompt ends inside think"):
        assert _joined(think[name]["chunks"], "thinking").strip() == "plan it", name
        assert _joined(think[name]["chunks"], "answer").endswith("42"), name
    assert _joined(think["no tags"]["chunks"], "answer") == "<thing> is not a tag, 42"
    assert not _joined(think["no tags"]["chunks"], "thinking")
    assert _joined(think["unicode whitespace after tag"]["chunks"], "answer") == "42"
    assert _joined(think["unclosed think"]["chunks"], "thinking") == "plan and more"
    stop = {c["name"]: c for c in app_vectors["vectors"]["stop"]}
    assert (stop["end token text ends the reply"]["text"], stop["end token text ends the reply"]["stop_reason"]) \
        == ("Hello there", "eos")
    assert stop["stop string split across pieces"]["text"] == "one"
    assert stop["stop string not completed"]["text"] == "a\nb"
    assert stop["earliest of two stop strings"]["text"] == "x "
    assert stop["stop string inside one piece"]["text"] == "Paris. "


def test_reply_vectors_match_the_runtime_generation(app_vectors):
    replies = app_vectors["vectors"]["replies"]
    for case in replies[:2]:  # real generations: the mirror of Session._stream gives what Session gave
        assert _joined(case["chunks"], "answer") == case["runtime"]["text"], case["name"]
        assert (case["stop_reason"] or "max_new_tokens") == case["runtime"]["stop_reason"], case["name"]
    assert replies[1]["stop_reason"] == "stop_string"
    thought = replies[2]
    assert _joined(thought["chunks"], "thinking") == "Use the map.\n"
    assert _joined(thought["chunks"], "answer") == "It is 東京 🙂."
    assert thought["stop_reason"] == "eos"
