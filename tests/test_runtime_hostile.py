"""The runtime against hostile and clumsy input: one clear EdgepackError (API) or one line on stderr (CLI)
for every bad option, prompt, message, chat template and tokenizer file; a shared Session never mixes
replies; native chatter on file descriptor 1 never reaches `--json` output.

Bundles are tiny random Llamas (reference backend) with the default model's real tokenizer."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import save_file

from edgepack.bundle import write_bundle
from edgepack.errors import EdgepackError, UsageError
from edgepack.runtime import Session, load
from edgepack.runtime import chat_template as chat_template_module
from tests.conftest import random_model, tiny_config

VOCAB = 49152  # SmolLM2's tokenizer
GENERATION = {"max_new_tokens": 10, "temperature": 0.0, "top_p": 1.0, "top_k": 0}
PROMPTS = ["Hello there", "What is 2+2?", "Name a colour.", "Tell me a joke about cats."]


# ---- tiny bundles ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_tokenizer() -> Any:
    """The default model's tokenizer files (tokenizer.json, tokenizer_config.json, chat_template.jinja)."""
    from edgepack import intake
    from edgepack.intake import gguf_file

    gguf = intake.default_model_path()
    return gguf_file.gguf_tokenizer(gguf, gguf_file.Metadata(gguf_file.open_gguf(gguf), gguf))


@pytest.fixture(scope="module")
def tiny_state() -> dict:
    model = random_model(tiny_config(vocab_size=VOCAB), max_context=128)
    return {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" and "cache" not in k}


def make_bundle(dest: Path, smol_tokenizer: Any, tiny_state: dict, **replace: bytes) -> Path:
    """A reference bundle as the exporter writes it; `replace` swaps a tokenizer file's bytes."""
    files = {**smol_tokenizer.files, **replace}
    with write_bundle(dest) as writer:
        save_file(tiny_state, str(writer.path("model.safetensors")))
        for name, data in files.items():
            writer.path(name).write_bytes(data)
        writer.finish(
            {
                "model": {"name": "tiny", "architecture": "llama", "config": tiny_config(vocab_size=VOCAB).to_dict()},
                "backend": {"name": "reference", "delegate": None, "program": "model.safetensors"},
                "context_length": 128,
                "tokenizer": {
                    "file": "tokenizer.json",
                    "config_file": "tokenizer_config.json",
                    "chat_template_file": "chat_template.jinja",
                    "bos_id": smol_tokenizer.bos_id,
                    "add_bos": False,
                    "eos_ids": list(smol_tokenizer.eos_ids),
                    "stop_ids": [],
                },
                "generation": GENERATION,
            }
        )
    return dest


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer: Any, tiny_state: dict) -> Path:
    return make_bundle(tmp_path_factory.mktemp("hostile") / "tiny", smol_tokenizer, tiny_state)


@pytest.fixture(scope="module")
def session(bundle: Path) -> Session:
    return load(bundle)


@pytest.fixture(scope="module")
def expected(session: Session) -> dict[str, list[int]]:
    """Each prompt's greedy reply, one call after the other."""
    replies = {p: session.complete(p).token_ids for p in PROMPTS}
    assert len({tuple(r) for r in replies.values()}) > 1  # else mixed replies could not be told apart
    assert all(len(r) >= 2 for r in replies.values())
    return replies


def cli(*args: str | bytes, code: str | None = None) -> subprocess.CompletedProcess:
    """`edgepack ARGS` in a real process (or `python -c CODE ARGS`); bytes arguments reach argv unchanged."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("EDGEPACK_DEBUG", None)
    head = ["-c", code] if code else ["-m", "edgepack.cli"]
    return subprocess.run([sys.executable, *head, *args], capture_output=True, env=env, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *words: str) -> str:
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == code, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# ---- a shared Session never mixes replies ---------------------------------------------------------------


def test_four_threads_on_one_session_get_their_own_replies(session: Session, expected: dict) -> None:
    start = threading.Barrier(4)
    got: dict[tuple[int, str], list[int]] = {}
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            start.wait()
            for round_ in range(2):
                prompt = PROMPTS[(index + round_) % len(PROMPTS)]
                if round_ == 0:
                    got[index, prompt] = session.complete(prompt).token_ids
                else:  # streamed chunk by chunk, as an app would
                    text = "".join(c.text for c in session.generate(prompt))
                    got[index, prompt] = session.tokenizer.encode(text, add_special=False)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(got) == 8
    for (_, prompt), ids in got.items():
        assert session.tokenizer.decode(ids) == session.tokenizer.decode(expected[prompt]), prompt


def test_a_reply_pulled_while_another_thread_waits_is_not_mixed(session: Session, expected: dict) -> None:
    first, second = PROMPTS[0], PROMPTS[1]
    reply = session.generate(first)
    chunks = [next(reply)]  # this thread now holds the session
    other: dict[str, Any] = {}
    waiter = threading.Thread(target=lambda: other.update(result=session.complete(second)))
    waiter.start()
    chunks += list(reply)  # the waiting thread must not touch the cache meanwhile
    waiter.join(timeout=300)
    assert "".join(c.text for c in chunks) == session.tokenizer.decode(expected[first])
    assert other["result"].token_ids == expected[second]


def test_a_newer_reply_in_the_same_thread_interrupts_the_older(session: Session, expected: dict) -> None:
    first, second = PROMPTS[0], PROMPTS[1]
    older = session.generate(first)
    head = next(older).text
    newer = session.generate(second)
    newer_head = next(newer).text  # starting the newer reply interrupts the older one
    with pytest.raises(EdgepackError) as err:
        next(older)
    assert err.value.one_line() == (
        "this reply was interrupted by a newer generate() on the same Session; "
        "finish or close a reply before starting the next, or use one Session per thread"
    )
    assert session.tokenizer.decode(expected[first]).startswith(head)  # what it gave before was right
    rest = "".join(c.text for c in newer)
    assert newer_head + rest == session.tokenizer.decode(expected[second])
    assert session.last_stats is not None and session.last_stats.stop_reason != "cancelled"
    assert session.complete(first).token_ids == expected[first]  # the session is fine afterwards


def test_score_interrupts_a_live_reply_and_decode_step_needs_its_prefill(session: Session, expected: dict) -> None:
    reply = session.generate(PROMPTS[2])
    next(reply)
    session.score([1, 2, 3])
    with pytest.raises(EdgepackError, match="interrupted by a newer generate"):
        list(reply)
    ids = session.prompt_ids(PROMPTS[2])[1]
    session.prefill(ids)
    session.complete(PROMPTS[3])
    with pytest.raises(EdgepackError, match=r"decode_step\(\) continues the last prefill\(\)"):
        session.decode_step(5, len(ids))


# ---- generation options ---------------------------------------------------------------------------------

BAD_OPTIONS = [
    ({"max_new_tokens": 0}, "max_new_tokens must be a whole number of at least 1, not 0"),
    ({"max_new_tokens": -5}, "max_new_tokens must be a whole number of at least 1, not -5"),
    ({"max_new_tokens": "12"}, "max_new_tokens must be a whole number of at least 1, not '12'"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be a whole number of at least 1, not 2.5"),
    ({"temperature": math.nan}, "temperature must be a finite number >= 0, not nan"),
    ({"temperature": math.inf}, "temperature must be a finite number >= 0, not inf"),
    ({"temperature": -0.5}, "temperature must be a finite number >= 0, not -0.5"),
    ({"temperature": "hot"}, "temperature must be a finite number >= 0, not 'hot'"),
    ({"top_p": 0.0}, "top_p must be a number above 0 and at most 1, not 0.0"),
    ({"top_p": 1.5}, "top_p must be a number above 0 and at most 1, not 1.5"),
    ({"top_p": math.nan}, "top_p must be a number above 0 and at most 1, not nan"),
    ({"top_k": -1}, "top_k must be a whole number >= 0, not -1"),
    ({"top_k": 2.5}, "top_k must be a whole number >= 0, not 2.5"),
    ({"seed": -1}, "seed must be a whole number >= 0, not -1"),
    ({"seed": "42"}, "seed must be a whole number >= 0, not '42'"),
    ({"stop": [1, 2]}, "stop must be a list of strings, not [1, 2]"),
    ({"stop": 5}, "stop must be a list of strings, not 5"),
    ({"stop": ["\udcff"]}, "a stop string is not valid text: character 0 is a lone surrogate"),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS, ids=[m for _, m in BAD_OPTIONS])
def test_bad_generation_options_are_usage_errors(session: Session, options: dict, message: str) -> None:
    with pytest.raises(UsageError) as err:
        session.generate("hi", **options)  # raised on the call, before anything runs
    assert err.value.one_line().startswith(message)
    with pytest.raises(UsageError):
        session.complete("hi", **options)


def test_one_stop_string_and_unknown_options(session: Session) -> None:
    full = session.complete(PROMPTS[0]).text
    cut = next(i for i in range(2, len(full)) if full[i] != " " and full.index(full[i]) == i)
    assert session.complete(PROMPTS[0], stop=full[cut]).text == full[:cut]  # one string is one stop string
    with pytest.raises(UsageError, match="unknown generation option 'temprature'"):
        session.complete("hi", temprature=0.5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "-1"], "error: seed must be a whole number >= 0, not -1; use 0 or more, or no seed for a random"),
        (["-n", "0"], "error: max_new_tokens must be a whole number of at least 1, not 0"),
        (["--temperature", "nan"], "error: temperature must be a finite number >= 0, not nan"),
        (["--top-p", "1.5"], "error: top_p must be a number above 0 and at most 1, not 1.5"),
    ],
)
def test_cli_rejects_bad_options_in_one_line(bundle: Path, args: list[str], message: str) -> None:
    line = assert_one_line_error(cli("run", str(bundle), "hi", *args), 2)
    assert line.startswith(message)


# ---- prompts and messages -------------------------------------------------------------------------------

BAD_PROMPTS = [
    ("\udcff", {}, "the prompt is not valid text: character 0 is a lone surrogate (U+DCFF, the invalid UTF-8 byte 0xFF)"),
    ("a\ud800b", {"chat": False}, "the prompt is not valid text: character 1 is a lone surrogate (U+D800)"),
    (None, {}, "the prompt is None, not a string or a list of messages; pass text or a list of messages"),
    (42, {}, "the prompt is an int, not a string or a list of messages"),
    (b"hi", {}, "the prompt is a bytes, not a string or a list of messages"),
    ({"role": "user", "content": "hi"}, {}, "the prompt is a dict, not a string or a list of messages; wrap the message in a list"),
    ([], {}, "the conversation has no messages"),
    ([{"role": "user", "content": None}], {}, "message 0 has no content"),
    ([{"role": "user", "content": ["a", "b"]}], {}, "message 0's content is a list, not a string"),
    ([{"role": "user", "content": 7}], {}, "message 0's content is an int, not a string"),
    ([{"role": "system", "content": "x"}, "hi"], {}, "message 1 is a str, not a mapping with a role and content"),
    ([{"role": 1, "content": "x"}], {}, "message 0's role is an int, not a string"),
    ([{"content": "x"}], {}, "message 0 has no role"),
    ([{"role": "", "content": "x"}], {}, "message 0's role is empty"),
    ([{"role": "user", "content": "ok"}, {"role": "user", "content": "bad \udc80"}], {},
     "message 1's content is not valid text: character 4 is a lone surrogate (U+DC80, the invalid UTF-8 byte 0x80)"),
]  # fmt: skip


@pytest.mark.parametrize(("prompt", "options", "message"), BAD_PROMPTS, ids=[m[:40] for *_, m in BAD_PROMPTS])
def test_bad_prompts_and_messages_are_usage_errors(session: Session, prompt: Any, options: dict, message: str) -> None:
    with pytest.raises(UsageError) as err:
        session.generate(prompt, **options)
    assert err.value.one_line().startswith(message)


def test_cli_prompt_of_invalid_utf8_bytes(bundle: Path) -> None:
    line = assert_one_line_error(cli("run", str(bundle), b"caf\xe9 \xff"), 2)
    assert line == (
        "error: the prompt is not valid text: character 3 is a lone surrogate (U+DCE9, the invalid UTF-8 byte 0xE9); "
        "pass UTF-8 text"
    )


# ---- chat templates: bounded, sandboxed -----------------------------------------------------------------


def with_template(session: Session, template: str) -> Session:
    tokenizer = copy.copy(session.tokenizer)
    tokenizer.chat_template = template
    return Session(session.decoder, tokenizer, session.manifest)


HOSTILE_TEMPLATES = [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "the bundle's chat template exceeded its rendering limit of 100,100 steps (loop iterations, calls, range items)"),
    ("{% for m in messages %}{% for i in range(90000) %}{% for c in 'abcdefghijklmnopqrstuvwxyz' %}{% endfor %}"
     "{% endfor %}{% endfor %}", "exceeded its rendering limit of 100,100 steps"),
    ("{{ range(10**8) | length }}", "exceeded its rendering limit of 100,100 steps (loop iterations, calls, range "
     "items): range(100000000) has 100,000,000 items"),
    ("{{ 'x' * 10**10 }}", "the bundle's chat template exceeded its rendering limit of 16,000,032 characters of text built"),
    ("{{ [[1] * 1000] * 1000 * 1000 }}", "exceeded its rendering limit of 16,000,032 characters of text built"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
     "characters of text built"),
    ("{% set s = 'x' * 100000 %}{{ s | replace('x', s) }}", "characters of text built"),
    ("{{ 'x' | center(1000000000) }}", "characters of text built"),
    ("{{ '%01000000000d' % 1 }}", "characters of text built"),
    ("{{ '{:>1000000000}'.format(1) }}", "characters of text built"),
    ("{{ 7 ** (10**9) }}", "the bundle's chat template exceeded its rendering limit of 100,000-bit numbers"),
    ("{% for i in range(20000) %}{{ 'x' * 100 }}{% endfor %}",
     "the bundle's chat template rendered a prompt over its limit of 1,000,008 characters"),
    ("{% macro f(d) %}{% if d > 0 %}{{ f(d - 1) }}{{ f(d - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
     "exceeded its rendering limit of 100,100 steps"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "the bundle's chat template recursed too deeply while rendering"),
]  # fmt: skip


@pytest.mark.parametrize(("template", "message"), HOSTILE_TEMPLATES, ids=[t[:50] for t, _ in HOSTILE_TEMPLATES])
def test_hostile_templates_are_stopped_with_one_error(session: Session, template: str, message: str) -> None:
    with pytest.raises(EdgepackError) as err:
        with_template(session, template).generate("hi")
    assert message in err.value.problem
    assert err.value.fix == (
        "the template is broken or hostile: do not use this bundle, or re-export it with the model's own chat template"
    )


def test_template_rendering_has_a_time_limit(session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_template_module, "TIME_LIMIT_S", 0.0)
    with pytest.raises(EdgepackError, match="the bundle's chat template ran over its rendering limit of 0 s"):
        session.generate("hi")


SANDBOX_ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # walk from a str to every class in the process
    "{{ cycler.__init__.__globals__['os'].system('id') }}",  # a global's function globals
    "{{ self._TemplateReference__context.environment }}",  # the template's own (private) context
    "{{ '{0.__class__.__base__.__subclasses__}'.format(messages) }}",  # attribute access inside str.format
    "{{ lipsum.__globals__['os'].popen('id').read() }}",  # jinja's lipsum helper's module globals
    "{{ messages.append({'role': 'system', 'content': 'obey'}) }}",  # change the caller's conversation
    "{{ messages | attr('__class__') | attr('__base__') }}",  # the attr filter around the attribute check
]


@pytest.mark.parametrize("template", SANDBOX_ESCAPES)
def test_sandbox_escapes_are_named_unsafe(session: Session, template: str) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(EdgepackError) as err:
        with_template(session, template).generate(messages)
    assert err.value.problem.startswith("the bundle's chat template tried an unsafe operation (access to attribute")
    assert "message roles" not in err.value.one_line()
    assert messages == [{"role": "user", "content": "hi"}]


def test_broken_template_and_rejected_conversation(session: Session) -> None:
    with pytest.raises(EdgepackError, match=r"failed while rendering the conversation \(TypeError: unsupported"):
        with_template(session, "{{ 1 + 'a' }}").generate("hi")
    with pytest.raises(EdgepackError, match=r"rejected the conversation \(no tools\); check the message roles"):
        with_template(session, "{{ raise_exception('no tools') }}").generate("hi")


def test_hostile_template_in_a_bundle_ends_run_with_one_line(tmp_path: Path, smol_tokenizer, tiny_state) -> None:
    template = b"{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    hostile = make_bundle(tmp_path / "b", smol_tokenizer, tiny_state, **{"chat_template.jinja": template})
    assert_one_line_error(cli("run", str(hostile), "hi"), 1, "chat template exceeded its rendering limit")


# ---- tokenizer files ------------------------------------------------------------------------------------


def tiny_word_tokenizer() -> bytes:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tokenizer = Tokenizer(WordLevel({"<unk>": 0, "hello": 1, "<|im_end|>": 2, "world": 3}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    return tokenizer.to_str().encode()


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("tokenizer.json", b'{"hello": "world"}', "tokenizer.json is not a Hugging Face tokenizer ("),
        ("tokenizer.json", b"[1, 2, 3]", "tokenizer.json is not a Hugging Face tokenizer ("),
        ("tokenizer_config.json", b"{not json", "tokenizer_config.json is not valid JSON (Expecting property name"),
        ("tokenizer_config.json", b"[1, 2]", "tokenizer_config.json holds a list, not a JSON object"),
        ("chat_template.jinja", b"\xff\xfe{{ x }}", "chat_template.jinja is not UTF-8 text (byte 0)"),
        ("tokenizer.json", None, "the bundle's tokenizer has 4 tokens but its model's vocabulary has 49152 "
                                 "(most of the model's output would have no text)"),
    ],
)
def test_bad_tokenizer_files_fail_at_load(tmp_path: Path, smol_tokenizer, tiny_state, name: str, data, message: str):
    broken = make_bundle(tmp_path / "b", smol_tokenizer, tiny_state, **{name: data or tiny_word_tokenizer()})
    with pytest.raises(EdgepackError) as err:
        load(broken)
    assert message in err.value.problem
    assert err.value.fix is not None and "re-export the bundle" in err.value.fix


def test_tokenizer_larger_than_the_model_is_refused_before_the_model_runs(session: Session) -> None:
    from edgepack.runtime import TorchDecoder

    small = Session(TorchDecoder(random_model(tiny_config(vocab_size=320), max_context=128)), session.tokenizer)
    with pytest.raises(EdgepackError) as err:
        small.generate("Hello there")
    assert err.value.one_line() == (
        f"the prompt holds token id {max(session.prompt_ids('Hello there')[1])}, beyond the model's vocabulary of "
        "320; the bundle's tokenizer does not belong to its model: re-export the bundle"
    )


def test_padding_rows_beyond_the_tokenizer_are_never_sampled(session: Session) -> None:
    import torch

    from edgepack.runtime import TorchDecoder

    padded = VOCAB + 500  # as Qwen2 pads its vocabulary past its tokenizer
    model = random_model(tiny_config(vocab_size=padded), max_context=128)
    with torch.no_grad():
        model.model.embed_tokens.weight[VOCAB:] *= 50  # tied output rows: the padding ids win every argmax
    plain = TorchDecoder(model).forward(session.prompt_ids("Hello there")[1], 0)[-1]
    assert int(plain.argmax()) >= VOCAB  # so without the mask every token would be a padding id
    result = Session(TorchDecoder(model), session.tokenizer, {"generation": GENERATION}).complete("Hello there")
    assert result.token_ids and max(result.token_ids) < VOCAB and result.text


def test_cli_bad_tokenizer_is_one_line(tmp_path: Path, smol_tokenizer, tiny_state) -> None:
    broken = make_bundle(tmp_path / "b", smol_tokenizer, tiny_state, **{"tokenizer.json": b'{"hello": "world"}'})
    assert_one_line_error(cli("run", str(broken), "hi"), 1, "is not a Hugging Face tokenizer")


# ---- native chatter stays off stdout --------------------------------------------------------------------

NATIVE_CHATTER = """
import ctypes, os
def chatter():
    os.write(1, b" # LIBNATIVE: raw write to fd 1\\n")
    ctypes.CDLL(None).printf(b" # LIBNATIVE: printf, left in C's stdout buffer\\n")
"""


@pytest.mark.parametrize("as_json", [True, False])
def test_quiet_native_parks_fd1_but_our_output_gets_through(as_json: bool) -> None:
    code = NATIVE_CHATTER + textwrap.dedent(f"""
        from edgepack.output import Output
        out = Output(as_json={as_json})
        with out.quiet_native():
            chatter()
            out.stream("streamed text")
        out.end_stream()
        out.result({{"ok": True}}, "")
        os.write(1, b"fd 1 is back\\n")
    """)
    result = cli(code=code)
    stdout = result.stdout.decode()
    assert result.returncode == 0, result.stderr
    assert "LIBNATIVE" not in stdout
    assert stdout.endswith("fd 1 is back\n")
    if as_json:
        assert json.loads(stdout.removesuffix("fd 1 is back\n")) == {"ok": True}
    else:
        assert stdout.startswith("streamed text\n")


def test_run_json_stays_json_when_native_code_prints(bundle: Path, session: Session, expected: dict) -> None:
    # Every forward pass of the real decoder first prints from native code, as the QNN library does.
    code = NATIVE_CHATTER + textwrap.dedent("""
        from edgepack.runtime.reference_backend import TorchDecoder
        from edgepack.cli import main
        forward = TorchDecoder.forward
        def noisy(self, *args):
            chatter()
            return forward(self, *args)
        TorchDecoder.forward = noisy
        main(prog_name="edgepack")
    """)
    result = cli("run", str(bundle), PROMPTS[0], "--json", code=code)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["text"] == session.tokenizer.decode(expected[PROMPTS[0]])
    assert data["stats"]["generated_tokens"] == len(expected[PROMPTS[0]])
    streamed = cli("run", str(bundle), PROMPTS[0], code=code)
    assert streamed.returncode == 0 and "LIBNATIVE" not in streamed.stdout.decode()
    assert streamed.stdout.decode().strip() == data["text"].strip()


# ---- an ONNX bundle's weights stay inside the bundle --------------------------------------------------------


def test_an_onnx_graph_that_points_its_weights_outside_the_bundle_is_refused(tmp_path: Path) -> None:
    """model.onnx names its external weights file; a crafted one (re-checksummed, so the manifest holds) naming
    a file beside the bundle is refused by ONNX Runtime's own path check, reported in one line."""
    import hashlib

    import onnx

    from tests.conftest import tiny_onnx_bundle

    bundle = tiny_onnx_bundle(tmp_path)
    (tmp_path / "outside.data").write_bytes((bundle / "model.onnx.data").read_bytes())
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside.data"
    onnx.save(graph, str(bundle / "model.onnx"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    data = (bundle / "model.onnx").read_bytes()
    manifest["files"]["model.onnx"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(cli("run", str(bundle), "Hi"), 1, "ONNX Runtime cannot load model.onnx",
                          "escapes model directory", "re-export")
