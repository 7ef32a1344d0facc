"""Chat templates rendered as `transformers` renders them, in a sandbox with a budget.

A chat template comes from the bundle, which may come from anyone: jinja's immutable sandbox already
keeps it from reaching Python internals or changing the caller's data, but not from running for hours
(`{% for i in range(100000) %}{% for j in range(100000) %}`) or building gigabytes (`'x' * 10**10`). So
every render gets a budget, charged from inside the sandbox:

- steps: loop iterations, calls, filters, operators and the items of every `range` (100,000 plus 100 per
  message);
- text: characters (and list items) the template builds with operators, `~`, literals, calls and
  filters, checked *before* an operation that would build more than is left (16,000,000 plus 16 per
  character of the conversation);
- output: the rendered prompt (1,000,000 characters plus 4 per character of the conversation);
- time: 10 s of wall time, checked at every step.

The budget is charged through an instrumented syntax tree (every loop and macro body starts with a
tick, every `~`, list, tuple and dict literal goes through a counting call) and through the sandboxed
environment's hooks (`call`, `call_binop`, `getattr`, the filters, `finalize`).
"""

from __future__ import annotations

import functools
import json
import re
import string
import time
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Callable, Mapping

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import generate_lorem_ipsum
from jinja2.visitor import NodeTransformer

from edgepack.errors import EdgepackError

STEP_LIMIT = 100_000
STEPS_PER_MESSAGE = 100
TEXT_LIMIT = 16_000_000
TEXT_PER_INPUT_CHAR = 16
OUTPUT_LIMIT = 1_000_000
OUTPUT_PER_INPUT_CHAR = 4
TIME_LIMIT_S = 10.0
TEMPLATE_MAX_CHARS = 1_000_000
INT_MAX_BITS = 100_000

_FIX_HOSTILE = (
    "the template is broken or hostile: do not use this bundle, or re-export it with the model's own chat template"
)
_FIX_UNSAFE = (
    "do not use this bundle: its chat template tries to reach outside its sandbox; re-export it from a model you trust"
)


class BudgetExceeded(Exception):
    """Raised from inside a render; not a jinja TemplateError, so nothing in the template can swallow it."""


@dataclass
class _Budget:
    steps: int
    text: int
    deadline: float

    def __post_init__(self) -> None:
        self.step_limit, self.text_limit = self.steps, self.text

    def step(self, n: int = 1, what: str = "") -> None:
        self.steps -= n
        if self.steps < 0:
            raise BudgetExceeded(
                f"the bundle's chat template exceeded its rendering limit of {self.step_limit:,} steps "
                f"(loop iterations, calls, range items){what}"
            )
        if time.monotonic() >= self.deadline:
            raise BudgetExceeded(f"the bundle's chat template ran over its rendering limit of {TIME_LIMIT_S:g} s")

    def check(self, n: int) -> None:
        """Refuse an operation that would build `n` more characters/items than are left."""
        if n > self.text:
            raise BudgetExceeded(
                f"the bundle's chat template exceeded its rendering limit of {self.text_limit:,} "
                "characters of text built"
            )

    def charge(self, n: int) -> None:
        self.check(n)
        self.text -= n


_BUDGET: ContextVar[_Budget | None] = ContextVar("edgepack_chat_template_budget", default=None)


def render(source: str, variables: Mapping[str, Any], messages: int, input_chars: int) -> str:
    """Render `source` with `variables` under a budget for a conversation of `messages` holding
    `input_chars` characters; every failure is one EdgepackError."""
    template = compile_chat_template(source)
    output_limit = OUTPUT_LIMIT + OUTPUT_PER_INPUT_CHAR * input_chars
    budget = _Budget(
        steps=STEP_LIMIT + STEPS_PER_MESSAGE * messages,
        text=TEXT_LIMIT + TEXT_PER_INPUT_CHAR * input_chars,
        deadline=time.monotonic() + TIME_LIMIT_S,
    )
    token = _BUDGET.set(budget)
    pieces: list[str] = []
    size = 0
    try:
        for piece in template.generate(**variables):
            size += len(piece)
            if size > output_limit:
                raise BudgetExceeded(
                    f"the bundle's chat template rendered a prompt over its limit of {output_limit:,} characters"
                )
            budget.step()
            pieces.append(piece)
        return "".join(pieces)
    except BudgetExceeded as e:
        raise EdgepackError(str(e), _FIX_HOSTILE) from None
    except MemoryError:
        raise EdgepackError("the bundle's chat template ran out of memory while rendering", _FIX_HOSTILE) from None
    except SecurityError as e:
        raise EdgepackError(f"the bundle's chat template tried an unsafe operation ({e})", _FIX_UNSAFE) from None
    except jinja2.TemplateError as e:
        raise EdgepackError(
            f"the bundle's chat template rejected the conversation ({e})",
            "check the message roles and their order (e.g. system first, user and assistant alternating)",
        ) from None
    except RecursionError:
        raise EdgepackError("the bundle's chat template recursed too deeply while rendering", _FIX_HOSTILE) from None
    except Exception as e:  # noqa: BLE001 - whatever else the template's own code raises is the template's fault
        raise EdgepackError(
            f"the bundle's chat template failed while rendering the conversation ({type(e).__name__}: {e})",
            _FIX_HOSTILE,
        ) from None
    finally:
        _BUDGET.reset(token)


@lru_cache(maxsize=8)
def compile_chat_template(template: str) -> jinja2.Template:
    """A jinja2 template in the environment `transformers` renders chat templates in, instrumented.

    trim/lstrip blocks, `loopcontrols`, the `{% generation %}` tag, the `raise_exception` and
    `strftime_now` globals and the `tojson` filter are what templates on the Hub rely on.
    """
    if len(template) > TEMPLATE_MAX_CHARS:
        raise EdgepackError(
            f"the bundle's chat template is {len(template):,} characters, over the {TEMPLATE_MAX_CHARS:,} one may have",
            "re-export the bundle with the model's own chat template",
        )
    env = _environment()
    try:
        return env.from_string(_Instrument().visit(env.parse(template)))
    except jinja2.TemplateSyntaxError as e:
        raise EdgepackError(f"the bundle's chat template does not parse ({e})", "re-export the bundle") from None
    except RecursionError:
        raise EdgepackError("the bundle's chat template is nested too deeply to parse", _FIX_HOSTILE) from None


# ---- the environment ----------------------------------------------------------------------------------


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; render the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, charging the render's budget at each of its hooks."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # jinja returns an Undefined that only fails when used further; fail at the attempt itself.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _BUDGET.get()
        if budget is None:
            return super().call_binop(context, operator, left, right)
        budget.step()
        if operator == "*":
            budget.check(_product_size(left, right))
        elif operator == "**":
            _check_power(budget, left, right)
        elif operator == "%" and isinstance(left, str):
            _check_printf(budget, left, right)
        elif operator == "+":
            budget.check(_size(left) + _size(right))
        result = super().call_binop(context, operator, left, right)
        budget.charge(_size(result))
        return result

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - jinja's names
        budget = _BUDGET.get()
        if budget is None or getattr(__obj, "_edgepack_internal", False):
            return super().call(__context, __obj, *args, **kwargs)
        budget.step()
        _check_int_args(budget, args, kwargs)
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            budget.check(_str_method_size(owner, getattr(__obj, "__name__", ""), args, kwargs))
        result = super().call(__context, __obj, *args, **kwargs)
        if not isinstance(owner, (dict, list, tuple)):  # their methods hand back what is already there
            budget.charge(_size(result))
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt: str = value.__self__

        @functools.wraps(wrapped)
        def checked(*args: Any, **kwargs: Any) -> str:
            budget = _BUDGET.get()
            if budget is not None:
                _check_format_spec_widths(budget, fmt)
                budget.check(len(fmt) + _size(args) + _size(kwargs))
            return wrapped(*args, **kwargs)

        return checked


@functools.lru_cache(maxsize=1)
def _environment() -> _BoundedEnvironment:
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # Jinja's own tojson escapes HTML characters, which would change the prompt.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002 - jinja's names
        budget = _BUDGET.get()
        if budget is not None:
            budget.check(n * max * 12)  # words of up to ~12 characters
        return generate_lorem_ipsum(n, html, min, max)

    env = _BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols], finalize=_finalize
    )
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, range=_range, lipsum=lipsum)
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    return env


def _internal(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a function the instrumented tree calls: it charges the budget itself."""
    fn._edgepack_internal = True  # type: ignore[attr-defined]
    return fn


def _finalize(value: Any) -> Any:
    """Every `{{ ... }}` on its way out, also inside macros and `{% set %}` blocks that are never printed."""
    budget = _BUDGET.get()
    if budget is not None:
        budget.charge(_size(value))
    return value


@_internal
def _range(*args: Any) -> range:
    rng = range(*args)
    budget = _BUDGET.get()
    if budget is not None:
        try:
            n = len(rng)
        except OverflowError:
            n = budget.steps + 1
        budget.step(n, f": range({', '.join(map(str, args))}) has {n:,} items")
    return rng


@_internal
def _tick(literal_chars: int) -> str:
    """First thing in every loop and macro body: one step, and the body's literal text."""
    budget = _BUDGET.get()
    if budget is not None:
        budget.step()
        budget.charge(literal_chars)
    return ""


@_internal
def _concat(*parts: Any) -> str:
    """The `~` operator (jinja's str_join), with the joined size checked before it is built."""
    budget = _BUDGET.get()
    if budget is not None:
        budget.step()
        budget.charge(sum(_size(p) for p in parts))
    return "".join(map(str, parts))


@_internal
def _built(value: Any) -> Any:
    """A list, tuple or dict literal: charged by its size as a tree (a list of one list 1,000 times is big)."""
    budget = _BUDGET.get()
    if budget is not None:
        budget.step()
        budget.charge(_size(value))
    return value


class _Instrument(NodeTransformer):
    """Rewrites a parsed template so that its loops, macros, `~` and literals charge the budget."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)
        node.body.insert(0, _call_node(_tick, nodes.Const(_literal_chars(node.body)), output=True))
        return node

    visit_Macro = visit_CallBlock = visit_For

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = self.generic_visit(node)
        return _call_node(_concat, *node.nodes)

    def visit_List(self, node: nodes.Node) -> nodes.Node:
        return _call_node(_built, self.generic_visit(node))

    visit_Dict = visit_List

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        node = self.generic_visit(node)
        return _call_node(_built, node) if node.ctx == "load" else node


def _call_node(fn: Callable[..., Any], *args: nodes.Expr, output: bool = False) -> nodes.Node:
    """A call of one of this module's functions, by import name: a template cannot shadow or reach it."""
    call = nodes.Call(nodes.ImportedName(f"{__name__}.{fn.__name__}"), list(args), [], None, None)
    return nodes.Output([call]) if output else call


def _literal_chars(body: list[nodes.Node]) -> int:
    """Literal text one run of `body` can emit (nested loops and macros charge their own)."""
    total, stack = 0, list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, nodes.TemplateData):
            total += len(node.data)
        elif isinstance(node, nodes.For):
            stack.extend(node.else_)
        elif not isinstance(node, (nodes.Macro, nodes.CallBlock)):
            stack.extend(node.iter_child_nodes())
    return total


# ---- sizes ----------------------------------------------------------------------------------------------


def _size(value: Any, depth: int = 0, memo: dict[int, int] | None = None) -> int:
    """Characters/items `value` stands for as a tree: what printing, joining or comparing it walks through.

    A list that holds one big list many times is small in memory but huge as a tree, so repeated
    references count every time (the memo only keeps the walk itself linear)."""
    if isinstance(value, str):
        return len(value)
    if not isinstance(value, (list, tuple, set, frozenset, dict)):
        return 1
    if depth > 64:
        return len(value)
    memo = {} if memo is None else memo
    key = id(value)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a cycle counts once
    items = [x for kv in value.items() for x in kv] if isinstance(value, dict) else value
    total = 1 + sum(1 + _size(x, depth + 1, memo) for x in items)
    memo[key] = total
    return total


def _product_size(left: Any, right: Any) -> int:
    """The size `left * right` would have, before it is built."""
    if isinstance(left, int) and isinstance(right, int):
        bits = abs(left).bit_length() + abs(right).bit_length()
        return 0 if bits <= INT_MAX_BITS else bits
    for seq, n in ((left, right), (right, left)):
        if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
            return max(n, 0) * _size(seq)
    return 0


def _check_power(budget: _Budget, base: Any, exponent: Any) -> None:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if abs(base).bit_length() * exponent > INT_MAX_BITS:
            raise BudgetExceeded(
                f"the bundle's chat template exceeded its rendering limit of {INT_MAX_BITS:,}-bit numbers "
                f"({base} ** {exponent})"
            )


_WIDTH = re.compile(r"\d+")
_PRINTF_SPEC = re.compile(r"%[#0\- +]*[\d*]*(?:\.[\d*]+)?")


def _check_widths(budget: _Budget, specs: list[str]) -> None:
    for spec in specs:
        for digits in _WIDTH.findall(spec):
            budget.check(int(digits) if len(digits) < 18 else budget.text + 1)


def _check_printf(budget: _Budget, fmt: str, args: Any) -> None:
    """`'%10000000s' % x` builds its width before anything can see it: check widths and arguments."""
    _check_widths(budget, _PRINTF_SPEC.findall(fmt))
    values = args if isinstance(args, tuple) else (args,)
    _check_int_args(budget, values, {})
    budget.check(len(fmt) + _size(args))


def _check_format_spec_widths(budget: _Budget, fmt: str) -> None:
    try:
        specs = [spec or "" for _, _, spec, _ in string.Formatter().parse(fmt)]
    except ValueError:
        return  # str.format raises its own error for it
    _check_widths(budget, specs)


def _check_int_args(budget: _Budget, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """A width, count or padding larger than what is left of the budget is refused before the call."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool):
            budget.check(abs(value))


def _str_method_size(s: str, name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    """What a str method can build beyond its int arguments (checked by `_check_int_args`)."""
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        return _replaced_size(s, args[0], args[1])
    if name == "join":
        parts = args[0] if args else ()
        return _size(parts) + len(s) * (_size(parts) if not isinstance(parts, (list, tuple)) else len(parts))
    if name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        return len(s) + s.count("\t") * (tab if isinstance(tab, int) else 8)
    return 0


def _replaced_size(s: str, old: str, new: str) -> int:
    hits = len(s) + 1 if old == "" else s.count(old)
    return len(s) + hits * max(len(new) - len(old), 0)


# ---- filters --------------------------------------------------------------------------------------------


def _text_arg(args: tuple[Any, ...], kwargs: Mapping[str, Any], index: int, name: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


# Filters whose output can outgrow their input (or walk it as a tree): sized before they run. The others
# (length, first, trim, ...) are only charged for what they return.
_BUILDING_FILTERS = frozenset(
    {"replace", "join", "indent", "wordwrap", "format", "tojson", "center", "string", "pprint", "list", "sum",
     "xmlattr", "urlize", "batch", "slice", "unique", "sort", "dictsort", "map", "groupby"}
)


def _filter_size(budget: _Budget, name: str, value: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    """What a builtin filter can build from `value` beyond its int arguments, before it runs."""
    text = value if isinstance(value, str) else ""
    if name == "replace":
        old, new = _text_arg(args, kwargs, 0, "old", ""), _text_arg(args, kwargs, 1, "new", "")
        return _replaced_size(str(value), str(old), str(new)) if isinstance(value, str) else _size(value)
    if name == "join":
        sep = str(_text_arg(args, kwargs, 0, "d", ""))
        return _size(value) * (1 + len(sep))
    if name == "indent":
        width = _text_arg(args, kwargs, 0, "width", 4)
        pad = width if isinstance(width, int) else len(str(width))
        return len(text) + (text.count("\n") + 1) * max(pad, 0)
    if name == "wordwrap":
        width = _text_arg(args, kwargs, 0, "width", 79)
        wrap = _text_arg(args, kwargs, 2, "wrapstring", None) or "\n"
        lines = len(text) // max(width if isinstance(width, int) else 1, 1) + 1
        return len(text) + lines * len(str(wrap))
    if name == "format":
        _check_widths(budget, _PRINTF_SPEC.findall(text))
        return len(text) + _size(args) + _size(kwargs)
    if name == "tojson":
        indent = _text_arg(args, kwargs, 1, "indent", None)
        return _size(value) * (2 + (indent if isinstance(indent, int) and indent > 0 else 0))
    return _size(value)


def _bounded_filter(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """A filter that steps the budget, checks what it would build, then charges what it built."""
    passes = getattr(fn, "jinja_pass_arg", None)

    @functools.wraps(fn)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        if budget is None:
            # Outside a render is only jinja's constant folding at compile time, which would run
            # `'x'|center(10**9)` unbounded; refusing makes it compile the call for render time instead.
            raise RuntimeError("filters run only while rendering")
        budget.step()
        values = args[1:] if passes is not None else args
        value, rest = (values[0], values[1:]) if values else (None, ())
        _check_int_args(budget, rest, kwargs)
        if name in _BUILDING_FILTERS:
            budget.check(_filter_size(budget, name, value, rest, kwargs))
        result = fn(*args, **kwargs)
        if result is not value:  # `default`, `first`, ... hand back what is already there
            budget.charge(_size(result))
        return result

    return bounded
