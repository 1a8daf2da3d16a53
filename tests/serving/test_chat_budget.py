"""Chat templates run under a budget (models_src.template_budget): a template from a checkpoint that
loops for ever or builds gigabytes is refused, fast and before the bomb is built, with a
message naming the model; normal templates render exactly as Jinja's sandbox renders them.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from models_src.chat import (SPECIAL_TEXT, TRANSCRIPT_TEMPLATE, ChatTemplateError,
                             ChatTemplateOverBudget, Message, checked)
from models_src.template_budget import MAX_BUILT, MAX_CHARS, MAX_STEPS

TURNS = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"  # passes the check
CONVERSATION = (Message("system", "You tell short stories."), Message("user", "A cat?"),
                Message("assistant", "  Yes. "), Message("user", "Longer?"))
PEAK_BYTES = 32 * 2**20  # the bombs ask for gigabytes; a refusal costs a few MiB at most


def refused_fast(source: str) -> ChatTemplateOverBudget:
    """checked(source) refuses it as over budget, within about a second of this thread's
    CPU (the budget is CPU time: on a busy machine the wall clock says nothing) and
    without building the bomb (tracemalloc's peak)."""
    tracemalloc.start()
    start = time.thread_time()
    try:
        with pytest.raises(ChatTemplateOverBudget) as refused:
            checked(source)
        took = time.thread_time() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert took < 2.0, f"refused after {took:.2f} s of CPU"  # 0.5 s, and tracemalloc's cost
    assert peak < PEAK_BYTES, f"{peak / 2**20:.0f} MiB"
    return refused.value


# ---- bombs ---------------------------------------------------------------------------

@pytest.mark.parametrize("bomb, why", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     f"more than {MAX_STEPS} loop iterations"),
    ("{% for m in messages %}{% for i in range(1000) %}{% for j in range(100000) %}"
     "{% endfor %}{% endfor %}{% endfor %}", f"more than {MAX_STEPS} loop iterations"),
    ("{% macro deep(n) %}{% for j in range(100000) %}{% endfor %}{{ deep(n) }}{% endmacro %}"
     "{% for m in messages %}{{ deep(1) }}{% endfor %}", f"more than {MAX_STEPS} loop iterations"),
    # loops whose bodies never run still cost a filter's test per item: the clock stops them
    ("{% for i in range(100000) %}{% for j in range(100000) if j < 0 %}{% endfor %}{% endfor %}",
     "it took more than 0.5 s"),
    ("{% macro two(n) %}{% if n %}{{ two(n - 1) }}{{ two(n - 1) }}{% endif %}{% endmacro %}"
     "{{ two(60) }}", "(took more than 0.5 s|more than 100000 loop)"),
], ids=["nested-ranges", "range-nested-deeper", "range-in-recursion", "filtered-loops",
        "exponential-macro"])
def test_a_template_that_loops_too_long_is_refused(bomb, why):
    assert "went over its budget" in str(refused_fast(bomb + TURNS))
    with pytest.raises(ChatTemplateOverBudget, match=why):
        checked(bomb + TURNS)  # the same verdict again, remembered: no second render


@pytest.mark.parametrize("bomb, why", [
    ("{{ 'x' * 10**10 }}", "`\\*` would build about 10000000000 characters"),
    ("{% set big = [0] * 10**9 %}", "`\\*` would build about 6000000000 characters"),
    ("{{ 10**9 * ['x'] }}", "`\\*` would build"),
    ("{{ 'x'.center(10**9) }}", "`center` was asked for about 1000000000 characters"),
    ("{{ 'x'.ljust(10**9) }}", "`ljust` was asked for"),
    ("{{ '7'.zfill(10**9) }}", "`zfill` was asked for"),
    ("{{ (1).to_bytes(10**9, 'big') }}", "`to_bytes` was asked for"),
    ("{{ 'x' | center(10**9) }}", "the `center` filter was asked for"),
    ("{{ '%1000000000s' % 'x' }}", "`%` would build"),
    ("{{ '%*s' % (10**9, 'x') }}", "`%` would build"),
    ("{{ '{:>1000000000}'.format('x') }}", "`format` would build"),
    ("{{ '%1000000000s' | format('x') }}", "the `format` filter would build"),
    ("{{ ('x' * 100000).replace('x', 'y' * 100000) }}", "`replace` would build"),
    ("{{ ('x' * 100000) | replace('', 'y' * 100000) }}", "the `replace` filter would build"),
    ("{{ ('\n' * 100000) | indent(100000) }}", "the `indent` filter would build"),
    ("{{ range(100000) | join('y' * 100000) }}", "the `join` filter would build"),
    ("{{ ('a' * 100000).translate({97: 'b' * 100000}) }}", "`translate` would build"),
    ("{{ 2 ** 100000000 }}", "`\\*\\*` would make an int of about 60400000 digits"),
], ids=["str-times", "list-times", "times-list", "center", "ljust", "zfill", "to_bytes",
        "center-filter", "percent-width", "percent-star", "format-width", "format-filter",
        "replace", "replace-filter", "indent", "join", "translate", "power"])
def test_a_value_too_big_to_build_is_refused_before_it_is_built(bomb, why):
    assert re.search(why, str(refused_fast(bomb + TURNS)))


@pytest.mark.parametrize("bomb, why", [
    # each step stays small; doubling reaches a gigabyte in thirty
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}", "`~` would build about 1048576 characters"),
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
     "{% endfor %}", "`\\+` would build about 1048576"),
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set s %}{{ ns.s }}{{ ns.s }}"
     "{% endset %}{% set ns.s = s %}{% endfor %}", "a block would build about 1048576"),
    # [x, x] is small in memory but prints, and compares, as twice x
    ("{% set ns = namespace(s=[1]) %}{% for i in range(64) %}{% set ns.s = [ns.s, ns.s] %}"
     "{% endfor %}{{ ns.s == ns.s }}", "a literal would build|took more than 0.5 s"),
    ("{% set s = 'x' * 900000 %}{{ [s] * 1000 }}", "`\\*` would build about 900006000"),
    # many values, each under the limit for one
    ("{% set s = 'x' * 900000 %}" + "".join(f"{{% set v{i} = s ~ {i} %}}" for i in range(20)),
     f"it built more than {MAX_BUILT} characters in all"),
    ("{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",
     f"it wrote more than {MAX_CHARS} characters"),
    ("{% for i in range(100000) %}" + "y" * 5000 + "{% endfor %}",
     f"it wrote more than {MAX_CHARS} characters"),
    ("{% macro m() %}{% for i in range(1000) %}" + "z" * 5000 + "{% endfor %}{% endmacro %}"
     "{% set x = m() %}", "a block would build about 5000000"),
], ids=["concat-doubling", "plus-doubling", "block-doubling", "literal-doubling", "repr-times",
        "many-values", "output-of-values", "output-of-text", "macro-output"])
def test_a_template_that_grows_values_step_by_step_is_refused(bomb, why):
    assert re.search(why, str(refused_fast(bomb + TURNS)))


def test_a_template_that_bombs_only_on_a_longer_conversation_is_refused_when_it_renders():
    template = checked("{% if messages | length > 3 %}{{ 'x' * 10**10 }}{% endif %}" + TURNS)
    assert template.render(CONVERSATION[:2]) == "system: You tell short stories.\nuser: A cat?\n"
    with pytest.raises(ChatTemplateOverBudget, match="`\\*` would build"):
        template.render(CONVERSATION)


def test_whatever_else_a_template_raises_is_a_chat_template_error():
    template = checked("{% if messages | length > 3 %}{{ 1 / 0 }}{% endif %}" + TURNS)
    with pytest.raises(ChatTemplateError, match="ZeroDivisionError"):
        template.render(CONVERSATION)
    with pytest.raises(ChatTemplateError, match="RecursionError"):
        checked("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}" + TURNS)
    with pytest.raises(ChatTemplateError, match="'lipsum' is undefined"):  # not offered
        checked("{{ lipsum(10**6) }}" + TURNS)
    with pytest.raises(ChatTemplateError, match="100001 characters long; the most is 100000"):
        checked(TURNS + " " * (100_001 - len(TURNS)))


# ---- normal templates ---------------------------------------------------------------

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA_2 = (  # Meta's, as in Llama-2-chat's tokenizer config
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")
BUSY = (  # most of what the budget watches, used as templates on the Hub use it
    "{%- set ns = namespace(system='', count=0) -%}"
    "{%- macro turn(role, text) -%}<|{{ role }}|>{{ text | trim }}{{ '\n' }}{%- endmacro -%}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] -%}"
    "{%- endif -%}"
    "{%- set users = messages | selectattr('role', 'equalto', 'user') | list -%}"
    "{{- '# %d user turns, %s\n' % (users | length, [1, 2] | join('/')) -}}"
    "{{- '{}: {}\n'.format('system', ns.system | replace('short', 'tiny')) -}}"
    "{%- for m in messages if m.role != 'system' -%}"
    "{%- set ns.count = ns.count + 1 -%}"
    "{{- turn(m.role, m.content ~ (' (last)' if loop.last else '')) -}}"
    "{%- endfor -%}"
    "{%- set roles -%}{{ messages | map(attribute='role') | join(',') }}{%- endset -%}"
    "{{- {'roles': roles, 'turns': ns.count, 'odd': [1, 3] * 2} | tojson -}}"
    "{%- if add_generation_prompt -%}{{ '\n' + '<|assistant|>' }}{%- endif -%}")
LONG_CONVERSATION = (Message("system", "Be brief."),) + tuple(
    Message(("user", "assistant")[i % 2], f"turn {i} " * 40) for i in range(301))


@pytest.mark.parametrize("source", [TRANSCRIPT_TEMPLATE, CHATML, LLAMA_2, BUSY],
                         ids=["transcript", "chatml", "llama-2", "busy"])
@pytest.mark.parametrize("conversation", [CONVERSATION, LONG_CONVERSATION], ids=["4", "302"])
def test_a_normal_template_renders_exactly_as_jinja_s_sandbox_does(source, conversation):
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source)
    expected = plain.render(messages=[{"role": m.role, "content": m.content} for m in conversation],
                            add_generation_prompt=True, **SPECIAL_TEXT)
    assert checked(source).render(conversation) == expected


def test_the_normal_templates_give_the_text_they_always_gave():
    assert checked(LLAMA_2).render(CONVERSATION) == (
        "[INST] <<SYS>>\nYou tell short stories.\n<</SYS>>\n\nA cat? [/INST]"
        " Yes. [INST] Longer? [/INST]")
    assert checked(LLAMA_2).turn_marker == " [INST]"
    assert checked(BUSY).render(CONVERSATION[:2]) == (
        "# 1 user turns, 1/2\nsystem: You tell tiny stories.\n<|user|>A cat? (last)\n"
        '{"odd": [1, 3, 1, 3], "roles": "system,user", "turns": 1}\n<|assistant|>')


# ---- threads ------------------------------------------------------------------------

def test_renders_in_many_threads_each_keep_their_own_budget_and_leave_nothing_behind():
    # each render builds 5/8 of the budget and takes 3/5 of the steps: a budget shared
    # between threads would refuse the renders that overlap
    heavy = checked("{% for i in range(60000) %}{% endfor %}"
                    "{% for i in range(5) %}{% set s = 'x' * 1000000 %}{% endfor %}" + CHATML)
    expected = checked(CHATML).render(CONVERSATION)
    bomb = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    start, tracer = threading.Barrier(8), sys.gettrace()

    def render(i: int) -> str:
        start.wait()
        if i % 4 == 3:  # a bomb alongside: refused, and the others not charged for it
            with pytest.raises(ChatTemplateOverBudget):
                checked(bomb + f"{{# {i} #}}" + TURNS)
            return expected
        return "".join(heavy.render(CONVERSATION) for _ in range(3))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(render, range(8)))
    assert results == [expected * 3, expected * 3, expected * 3, expected] * 2
    assert sys.gettrace() is tracer  # no trace function: the checks are in the compiled code
    from models_src.template_budget import _current
    assert _current.get(None) is None  # no budget left set in this thread


# ---- through the app ----------------------------------------------------------------

def with_template(folder, name: str, template: str, checkpoint_dir) -> None:
    shutil.copytree(checkpoint_dir / "endless", folder / name)
    config = folder / name / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": template}))


@pytest.fixture
def bombs(make_app, checkpoint_dir, tmp_path):
    """A client over "endless" and three checkpoints whose chat templates are bombs."""
    folder = tmp_path / "checkpoints"
    shutil.copytree(checkpoint_dir / "endless", folder / "endless")
    with_template(folder, "loops", "{% for i in range(100000) %}{% for j in range(100000) %}"
                  "{% endfor %}{% endfor %}{# app #}" + TURNS, checkpoint_dir)
    with_template(folder, "memory", "{{ 'x' * 10**10 }}{# app #}" + TURNS, checkpoint_dir)
    # the check's sample exchange starts with the user: this one passes it
    with_template(folder, "late", "{% if messages[0].role == 'system' %}{{ 'x'.center(10**10) }}"
                  "{% endif %}{# app #}" + TURNS, checkpoint_dir)
    return make_app(FABLE_CHECKPOINT_DIR=str(folder)).test_client()


@pytest.mark.parametrize("model", ["loops", "memory", "late"])
@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_a_model_whose_template_is_a_bomb_gets_a_4xx_naming_it_and_the_others_still_answer(
        bombs, path, model):
    body = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Hi"}], "stream": False,
            **({"options": {"num_predict": 2}} if path == "/api/chat" else {"max_tokens": 2})}
    start = time.thread_time()  # the test client renders in this thread
    refused = bombs.post(path, json={**body, "model": model})
    assert time.thread_time() - start < 3.0
    assert 400 <= refused.status_code < 500, refused.get_data(as_text=True)
    error = refused.json["error"]
    message = error if path == "/api/chat" else error["message"]
    assert f"model {model!r}" in message
    if model == "late":  # its template passes the check at load: refused as it renders
        assert refused.status_code == 400 and "went over its budget" in message
        assert "`center` was asked for" in message
    answered = bombs.post(path, json={**body, "model": "endless"})
    assert answered.status_code == 200


def test_a_server_template_over_the_budget_stops_the_start(make_app):
    from app.platform.settings import SettingsError

    with pytest.raises(SettingsError, match="FABLE_CHAT_TEMPLATE: the chat template went over "
                                            "its budget: `center` was asked for"):
        make_app(FABLE_CHAT_TEMPLATE="{{ 'x'.center(10**9) }}" + TURNS)


def test_a_checkpoint_whose_template_fails_its_check_is_refused_at_load(bombs):
    """Rendered once under its budget while loading: the admin page and /healthz count it
    as an error naming the checkpoint, before any client asks; one that passes the check
    (it bombs only on a system message) loads."""
    registry = bombs.application.extensions["fable.registry"]
    assert sorted(registry.errors) == ["loops", "memory"]
    assert "loops: its chat template is refused" in registry.errors["loops"]
    assert "more than 100000 loop iterations" in registry.errors["loops"]
    assert "would build" in registry.errors["memory"]
    assert registry.names() == ["endless", "late"]
