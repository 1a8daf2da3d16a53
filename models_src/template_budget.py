"""A budget for rendering Jinja templates that come with a checkpoint (chat templates).

Jinja's immutable sandbox keeps a template away from Python's internals, not from the
machine's time and memory: two nested ``range(100000)`` loops ran for minutes, and
``"x" * 10**10`` allocated until the worker died. ``ENVIRONMENT`` is that sandbox with a
budget for every render (``render``): CPU time, loop steps, the size of any one value and
of all the values built, the text written. A render over it raises ``OverBudget`` before
the value that would break it is built.
"""

from __future__ import annotations

import re
import sys
import time
from collections import abc
from contextlib import closing
from contextvars import ContextVar
from functools import wraps
from itertools import repeat
from string import Formatter
from types import BuiltinFunctionType

from jinja2 import Environment, Template, Undefined
from jinja2.compiler import CodeGenerator
from jinja2.nodes import EvalContext
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

# A chat template renders a conversation in well under a millisecond; these are far above
# that and far below what hurts a server that is generating for other clients meanwhile.
RENDER_SECONDS = 0.5  # of the rendering thread's CPU time
MAX_STEPS = 100_000  # loop iterations, macro calls and blocks entered
MAX_CHARS = 1_000_000  # the rendered text, and any one value a template builds, as text
MAX_BUILT = 8 * MAX_CHARS  # all the values one render builds, together
MAX_INT_DIGITS = sys.int_info.default_max_str_digits  # Python will not print a longer int


class OverBudget(ValueError):
    """A render that went over its budget, refused before it went further."""


def render(template: Template, **variables) -> str:
    """The template's text, rendered under a fresh budget in this thread (a ContextVar:
    each request thread renders under its own)."""
    token = _current.set(_Budget())
    try:
        pieces, size = [], 0
        with closing(template.generate(**variables)) as stream:
            for piece in stream:  # counted as it comes: a loop can yield far more than fits
                size += len(piece)
                if size > MAX_CHARS:
                    raise OverBudget(f"it wrote more than {MAX_CHARS} characters")
                pieces.append(piece)
        return "".join(pieces)
    finally:
        _current.reset(token)


# ---- the budgeted sandbox -------------------------------------------------------------
# The budget is checked where a template spends: a step each time a loop body, macro or
# block is entered (the compiled code calls it), and a size before each operation that can
# build a large value: + * % ** and ~, a call, a filter, a literal, a {{ }} and a captured
# block. Hand-written because Jinja has no budget of its own (its sandbox caps a single
# range() and nothing else); a per-thread trace function would cost every line of the
# render and could not stop an allocation made in C, such as "x" * 10**10.

# Outside a render _current.get() raises LookupError: Jinja's compile-time constant
# folding, which calls filters and finalize, then leaves the expression to the render.
_current: ContextVar[_Budget] = ContextVar("chat_template_budget")


class _Budget:
    """What one render has spent. The checks are on every hot path of a render, so each
    is one comparison until something is over."""

    __slots__ = ("cpu_start", "deadline", "steps", "built")

    def __init__(self) -> None:
        self.cpu_start = time.thread_time()
        self.deadline = time.monotonic() + RENDER_SECONDS
        self.steps = self.built = 0

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise OverBudget(f"more than {MAX_STEPS} loop iterations and macro calls")
        if time.monotonic() > self.deadline:
            self.check_time()

    def fits(self, chars: int, what) -> None:
        """Before ``what`` (a description, or the callable) builds a value of about
        ``chars`` characters."""
        if chars > MAX_CHARS or time.monotonic() > self.deadline:
            self._over(chars, what)

    def build(self, chars: int, what) -> None:
        """``fits``, and counted toward all that the render builds."""
        self.built += chars
        if chars > MAX_CHARS or self.built > MAX_BUILT or time.monotonic() > self.deadline:
            self._over(chars, what)

    def check_time(self) -> None:
        """The wall clock is cheap to read and says when to look; this thread's CPU time
        is the budget (on a busy machine a render may wait for a core, at no cost)."""
        if time.monotonic() > self.deadline:
            spent = time.thread_time() - self.cpu_start
            if spent > RENDER_SECONDS:
                raise OverBudget(f"it took more than {RENDER_SECONDS:g} s")
            self.deadline = time.monotonic() + RENDER_SECONDS - spent

    def _over(self, chars: int, what) -> None:
        if chars > MAX_CHARS:
            raise OverBudget(f"{_named(what)} would build {_amount(chars)} characters; "
                               f"one value may hold {MAX_CHARS}")
        if self.built > MAX_BUILT:
            raise OverBudget(f"it built more than {MAX_BUILT} characters in all")
        self.check_time()


def _named(what) -> str:
    """A description, or how to name a callable in a message (made only when one is)."""
    return what if isinstance(what, str) else f"`{getattr(what, '__name__', type(what).__name__)}`"


class _BudgetedCodeGenerator(CodeGenerator):
    """Jinja's code generator, with the budget's checkpoints written into the code."""

    def enter_frame(self, frame) -> None:
        # every loop iteration, macro call, block and scope starts with its frame
        super().enter_frame(frame)
        self.writeline("environment.step()")

    def visit_Concat(self, node, frame) -> None:
        # `a ~ b`: the parts' size is checked before they are joined (Jinja's own choice
        # of join function, which markup_join or str_join, is kept)
        if frame.eval_ctx.volatile:
            join = "(markup_join if context.eval_ctx.volatile else str_join)"
        else:
            join = "markup_join" if frame.eval_ctx.autoescape else "str_join"
        self.write(f"environment.joined({join}, (")
        for part in node.nodes:
            self.visit(part, frame)
            self.write(", ")
        self.write("))")

    # [x, x] takes no more memory than x, but prints as twice as much, and compares in
    # twice the time: doubled in a loop, it would stall the server inside one C call.
    def visit_List(self, node, frame) -> None:
        self._literal(super().visit_List, node, frame)

    def visit_Dict(self, node, frame) -> None:
        self._literal(super().visit_Dict, node, frame)

    def visit_Tuple(self, node, frame) -> None:
        if node.ctx != "load":  # a target: `{% for a, b in ... %}`
            return super().visit_Tuple(node, frame)
        self._literal(super().visit_Tuple, node, frame)

    def _literal(self, visit, node, frame) -> None:
        self.write("environment.literal(")
        visit(node, frame)
        self.write(")")


_OPERATORS = {op: f"`{op}`" for op in ("+", "*", "%", "**")}  # the ones that build, named


class _BudgetedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, each of whose renders keeps within the budget."""

    code_generator_class = _BudgetedCodeGenerator
    intercepted_binops = frozenset(_OPERATORS)

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.finalize = self._before_output
        self.filters = {name: _budgeted_filter(name, f) for name, f in self.filters.items()}
        # lipsum writes n paragraphs in a Python loop no step counts; no chat template
        # needs it
        del self.globals["lipsum"]

    # -- called by the compiled code
    def step(self) -> None:
        _current.get().step()

    def joined(self, join, parts: tuple) -> str:
        _current.get().build(sum(_text_size(part) for part in parts), "`~`")
        return join(parts)

    def literal(self, value):
        # only fits: a literal holds references to values that were counted when built
        _current.get().fits(_text_size(value), "a literal")
        return value

    def _before_output(self, value):
        """``{{ value }}``: a value that is not text yet is turned into text next."""
        if type(value) is not str:
            _current.get().build(_text_size(value), "`{{ }}`")
        return value

    def concat(self, pieces) -> str:
        """Joins a buffer: a macro's output, a ``{% set %}`` or ``{% filter %}`` block's."""
        pieces = pieces if isinstance(pieces, list) else list(pieces)
        _current.get().build(sum(map(len, pieces)), "a block")
        return "".join(pieces)

    # -- the sandbox's hooks
    def call_binop(self, context, operator: str, left, right):
        if type(left) is str and type(right) is str and operator == "+":  # most, made cheap
            size = len(left) + len(right)
        else:
            size = _binop_size(operator, left, right)
        _current.get().build(size, _OPERATORS[operator])
        return self.binop_table[operator](left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (the sandbox's names)
        budget = _current.get()
        if isinstance(__obj, BuiltinFunctionType):  # C code: it allocates what it is asked
            if args or kwargs:
                _refuse_huge_ints(args, kwargs, __obj)
            size_of = (_TEXT_METHOD_SIZES.get(__obj.__name__)
                       if isinstance(getattr(__obj, "__self__", None), (str, bytes)) else None)
            if size_of is not None:
                if __obj.__name__ == "join" and args:
                    args = (list(args[0]), *args[1:])  # measured, so made a list first
                budget.fits(size_of(__obj.__self__, *args, **kwargs), __obj)
        result = super().call(__context, __obj, *args, **kwargs)
        budget.build(_text_size(result), __obj)
        return result

    def wrap_str_format(self, value):
        """``"...".format(...)``: the sandbox's wrapper, after a look at how long the
        text will be (its fields' widths, and the values they print)."""
        format_ = super().wrap_str_format(value)
        if format_ is None:
            return None
        template, is_map = value.__self__, value.__name__ == "format_map"

        @wraps(format_)
        def budgeted(*args, **kwargs):
            values = (list(args[0].values()) if is_map and args and isinstance(args[0], abc.Mapping)
                      else [*args, *kwargs.values()])
            _current.get().fits(_format_size(template, values, "{"), "`format`")
            return format_(*args, **kwargs)
        return budgeted


def _budgeted_filter(name: str, filter_):
    """``filter_`` checked as a call is: no huge count or width, an estimate of its text
    first where it can grow far beyond its input, what it built counted after."""
    what = f"the `{name}` filter"
    estimate = _FILTER_SIZES.get(name)

    @wraps(filter_)  # keeps Jinja's pass_context & co. marks: it gets the same arguments
    def budgeted(*args, **kwargs):
        budget = _current.get()
        first = 1 if isinstance(args[0], (Context, EvalContext, Environment)) else 0
        if len(args) > first + 1 or kwargs:
            _refuse_huge_ints(args[first + 1:], kwargs, what)
        if estimate is not None:
            value = args[first]
            if name in ("join", "sum") and not isinstance(value, abc.Sized):
                value = list(value)  # a generator: measured, so made a list first
                args = (*args[:first], value, *args[first + 1:])
            budget.fits(estimate(value, *args[first + 1:], **kwargs), what)
        result = filter_(*args, **kwargs)
        budget.build(_text_size(result), what)
        return result
    return budgeted


# ---- sizes: how long a value prints, and how long an operation's result will be -------

def _text_size(value, indent: int = 0) -> int:
    """About how many characters ``value`` prints as, counted only until past MAX_CHARS:
    the same list twice in a list, doubled forty times, is small in memory and prints
    as terabytes. ``indent``: characters per level of nesting on each item's line, as
    tojson(indent=...) and pprint lay them out. Iterative: depth cannot exhaust the stack.
    By type, not isinstance: a Namespace answers isinstance's __class__ in Python."""
    if type(value) is str:
        return len(value)
    size, todo = 0, [(value, 0)]
    while todo and size <= MAX_CHARS:
        value, depth = todo.pop()
        kind = type(value)
        if issubclass(kind, str):
            size += len(value) + (2 if depth else 0)  # quoted inside a container
            continue
        if issubclass(kind, (bytes, bytearray)):
            size += 4 * len(value) + 3  # b'\x00'
            continue
        if issubclass(kind, int):
            size += 5 if kind is bool else value.bit_length() * 3 // 10 + 2
            continue
        if kind is Namespace:  # prints as <Namespace {its attributes}>
            size += 12
            value = value._Namespace__attrs  # noqa: SLF001 (where Jinja keeps them)
            kind = dict
        if issubclass(kind, (list, tuple)):
            items = value
        elif issubclass(kind, (dict, abc.Mapping)):
            items = [x for pair in value.items() for x in pair]
        elif issubclass(kind, (set, frozenset, abc.MappingView)):
            items = list(value)
        else:
            size += 0 if issubclass(kind, Undefined) else 64  # None, a float, a macro: short
            continue
        size += 2 + (2 + indent * (depth + 1)) * len(items)  # brackets, separators
        if size <= MAX_CHARS:
            todo.extend(zip(items, repeat(depth + 1)))
    return size


def _amount(chars: int) -> str:
    return f"about {chars}" if chars < 10**15 else "more than 10**15"


def _refuse_huge_ints(args, kwargs, what: str) -> None:
    """A count or width over MAX_CHARS asks C code for more than a value may hold:
    "x".center(10**9) allocates its gigabyte before anything can look at the result."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and value > MAX_CHARS:
            raise OverBudget(f"{_named(what)} was asked for {_amount(value)} characters "
                               f"or items; one value may hold {MAX_CHARS}")


def _refuse_long_int(digits: float, what: str) -> None:
    # multiplying ints of millions of digits takes seconds inside one C call
    if digits > MAX_INT_DIGITS:
        raise OverBudget(f"{what} would make an int of {_amount(int(digits))} digits; "
                           f"Python prints at most {MAX_INT_DIGITS}")


_SEQUENCES = (str, bytes, list, tuple)


def _binop_size(operator: str, left, right) -> int:
    """About how many characters ``left <operator> right`` builds (0: a number)."""
    if operator == "+" and isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
        return _text_size(left) + _text_size(right)
    if operator == "*":
        if isinstance(left, _SEQUENCES) and isinstance(right, int):
            return _text_size(left) * max(right, 0)
        if isinstance(right, _SEQUENCES) and isinstance(left, int):
            return _text_size(right) * max(left, 0)
        if isinstance(left, int) and isinstance(right, int):
            _refuse_long_int((left.bit_length() + right.bit_length()) * 0.302, "`*`")
    if (operator == "**" and isinstance(left, int) and isinstance(right, int)
            and right > 0 and abs(left) > 1):
        _refuse_long_int(left.bit_length() * right * 0.302, "`**`")
    if operator == "%" and isinstance(left, (str, bytes)):
        values = (list(right) if isinstance(right, tuple) else
                  list(right.values()) if isinstance(right, abc.Mapping) else [right])
        return _format_size(left, values, "%")
    return 0


_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?[hlL]?.", re.S)
_NUMBER = re.compile(r"\d+")


def _format_size(template: str | bytes, values: list, style: str) -> int:
    """About how long ``template`` comes out formatted with ``values`` (``style``: "%" or
    "{"): each field as wide as the widest width or precision asked for, plus the
    longest value."""
    text = template if isinstance(template, str) else template.decode("latin-1")
    if style == "%":
        specs = ["".join(pair) for pair in _PERCENT_FIELD.findall(text)]
    else:
        specs = [spec or "" for _, name, spec, _ in Formatter().parse(text) if name is not None]
    widths = [int(n) if len(n) <= 9 else 10**9 for spec in specs for n in _NUMBER.findall(spec)]
    if any("*" in spec or "{" in spec for spec in specs):  # widths taken from the values
        widths += [v for v in values if isinstance(v, int)]
    longest = max((_text_size(v) for v in values), default=0)
    return len(text) + len(specs) * (max(widths, default=0) + longest)


def _joined_size(separator, items) -> int:
    return sum(_text_size(item) for item in items) + len(separator) * max(len(items) - 1, 0)


def _translated_size(text, table, *deleted) -> int:
    entries = (table.values() if isinstance(table, abc.Mapping) else
               table if isinstance(table, (list, tuple)) else ())
    return len(text) * max([1, *(_text_size(entry) for entry in entries)])


def _expanded_size(text, tabsize=8) -> int:
    return len(text) + text.count("\t" if isinstance(text, str) else b"\t") * max(tabsize, 0)


def _replaced_size(text, old, new, count=-1) -> int:
    found = text.count(old) if old else len(text) + 1
    if count is not None and count >= 0:
        found = min(found, count)
    return len(text) + found * max(len(new) - len(old), 0)


def _lines(text: str) -> int:
    return text.count("\n") + 1


# The str and bytes methods whose result can be far longer than their text and
# arguments: (text, *arguments) -> an estimate before they run (center & co. are bounded
# by their width, which _refuse_huge_ints bounds).
_TEXT_METHOD_SIZES = {"replace": _replaced_size, "expandtabs": _expanded_size,
                      "translate": _translated_size, "join": _joined_size}


# The filters whose result can be many times longer than their input and arguments: an
# estimate from (value, *arguments) before they run. The rest grow a few times at most
# (escape, upper, tojson's escapes) and are counted after.
_FILTER_SIZES = {
    "replace": lambda s, old, new, count=None: _replaced_size(str(s), str(old), str(new), count),
    "indent": lambda s, width=4, first=False, blank=False: (
        len(str(s)) + _lines(str(s)) * (width if isinstance(width, int) else len(str(width)))),
    "join": lambda items, d="", attribute=None: _joined_size(str(d), items),
    "format": lambda value, *args, **kwargs: (
        _format_size(str(value), [*args, *kwargs.values()], "%")),
    "tojson": lambda value, indent=None: _text_size(value, indent=1 + indent if indent else 0),
    "pprint": lambda value: _text_size(value, indent=1),
    "wordwrap": lambda s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True: (
        len(str(s)) + (len(str(s)) // max(width, 1) + _lines(str(s))) * len(wrapstring or "\n")),
    # each step of a sum of lists or strings copies the sum so far
    "sum": lambda items, attribute=None, start=0: (
        0 if isinstance(start, (int, float)) else
        (_text_size(start) + sum(_text_size(item) for item in items)) * max(len(items), 1)),
    "batch": lambda value, linecount, fill_with=None: (
        _text_size(value) + max(linecount, 0) * (_text_size(fill_with) + 2)),
    "slice": lambda value, slices, fill_with=None: (
        _text_size(value) + max(slices, 0) * (_text_size(fill_with) + 4)),
}

ENVIRONMENT = _BudgetedSandbox(trim_blocks=True, lstrip_blocks=True)
