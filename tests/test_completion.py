"""Completion requests, prompt layout and stopping, on the default model's real tokenizer."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

import pltkit
from pltkit.model.tokenizer import PLTTokenizer
from pltkit.runtime.completion import CompletionRequest, RequestError, clip, layout
from pltkit.runtime.stopping import Stopper, trim_suffix_repeat


@pytest.fixture(scope="module")
def tok():
    return pltkit.load_tokenizer("default")


def run(tok, req, text, eos=()):
    """Feed `text` token by token as a model would produce it; return (shown, final, stopper)."""
    stopper, ids, shown = Stopper(req, eos), [], ""
    for t in tok.encode(text):
        ids.append(t)
        so_far = tok.decode(ids)
        n = stopper.feed(t, so_far)
        assert so_far[:n].startswith(shown), "text already shown was taken back"
        shown = so_far[:n]
        if stopper.stop_type:
            break
    return shown, stopper


def test_stop_string_split_across_tokens_is_never_shown(tok):
    req = CompletionRequest(stop=("# done",), n_predict=-1)
    assert len(tok.encode("# done")) > 1
    shown, st = run(tok, req, "return x  # done\nmore = 1\n")
    assert st.stop_type == "word" and st.stopping_word == "# done"
    assert st.text_final == shown == "return x  " and "#" not in shown


def test_n_indent_stops_before_a_dedented_line(tok):
    req = CompletionRequest(n_indent=4, n_predict=-1)
    shown, st = run(tok, req, "total += x\n    if total > 9:\n        break\nreturn total\n")
    assert st.stop_type == "limit" and st.text_final == "total += x\n    if total > 9:\n        break"


def test_single_line(tok):
    shown, st = run(tok, CompletionRequest(single_line=True, n_predict=-1), "value = compute(a, b)\nnext_line()\n")
    assert st.stop_type == "limit" and st.text_final == "value = compute(a, b)"


def test_eos_and_max_tokens(tok):
    _, st = run(tok, CompletionRequest(n_predict=3), "a = b + c + d + e")
    assert st.stop_type == "limit" and st.n == 3
    stopper = Stopper(CompletionRequest(), tok.eos_ids)
    stopper.feed(tok.eos_ids[0], "x = 1")
    assert stopper.stop_type == "eos" and stopper.text_final == "x = 1"


def test_suffix_repetition_is_trimmed(tok):
    emitted = tok.decode(tok.encode("print(total)\n"))  # as decoded from the model's tokens
    assert trim_suffix_repeat(emitted, tok.decode(tok.encode(")\n"))) == "print(total"
    assert trim_suffix_repeat("x = 1\nreturn x\n", "return x\n    ") == "x = 1\n"
    assert trim_suffix_repeat("x = 1\n", "\n\n") == "x = 1\n"  # whitespace alone is not a repeat
    assert trim_suffix_repeat("abc", None) == "abc"


def test_psm_layout_and_typing_changes_only_the_tail(tok):
    fim = tok.fim
    a = layout(tok, CompletionRequest(prefix="def f(x):\n", suffix="\n    return y\n", prompt="    y = x"), 500)
    b = layout(tok, CompletionRequest(prefix="def f(x):\n", suffix="\n    return y\n", prompt="    y = x +"), 500)
    assert a.ids[0] == fim.prefix and fim.suffix in a.ids and fim.middle in a.ids
    assert a.ids.index(fim.prefix) < a.ids.index(fim.suffix) < a.ids.index(fim.middle)
    common = next((i for i, (u, v) in enumerate(zip(a.ids, b.ids)) if u != v), min(len(a.ids), len(b.ids)))
    assert common >= a.ids.index(fim.middle) + 1  # everything up to the current line is unchanged
    spm = layout(tok, CompletionRequest(prefix="a = 1\n", suffix="b = 2\n", fim_order="spm"), 500)
    assert spm.ids.index(fim.suffix) < spm.ids.index(fim.prefix) < spm.ids.index(fim.middle)


def test_budgets_keep_prefix_end_and_suffix_start(tok):
    prefix = "".join(f"line_{i} = {i}\n" for i in range(300))
    suffix = "".join(f"after_{i} = {i}\n" for i in range(300))
    p = layout(tok, CompletionRequest(prefix=prefix, suffix=suffix), 200)
    assert len(p.ids) <= 200 and p.truncated
    text = tok.decode(p.ids)
    assert "line_299 = 299" in text and "line_0 =" not in text
    assert "after_0 = 0" in text and "after_299" not in text
    assert p.parts["suffix"] <= 200 // 4


def test_extra_chunks_with_file_names(tok):
    req = CompletionRequest(prefix="x = helper(", suffix="", filename="main.py",
                            extra=(("util.py", "def helper(a):\n    return a\n"),))
    text = tok.decode(layout(tok, req, 400).ids)
    assert text.startswith("<|file_sep|>util.py\ndef helper(a):") and "<|file_sep|>main.py\n<|fim_prefix|>" in text
    small = layout(tok, req, 12)  # no room for the extra chunk: it is dropped, not cut
    assert tok.fim.file_sep not in small.ids


def test_infill_without_fim_tokens_continues_the_prefix(tmp_path):
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = PLTTokenizer.from_dir(tmp_path)
    p = layout(tok, CompletionRequest(prefix="ab", prompt="c", suffix="zz"), 100)
    assert p.ids == tok.encode("abc") and p.parts["prefix_only"]


def feed_text(stopper: Stopper, text: str, step: int = 1) -> tuple[int, str]:
    """Feed text a few characters per token; (shown length at the end, final text or "")."""
    safe = 0
    for end in range(step, len(text) + step, step):
        safe = stopper.feed(5, text[:end])
        if stopper.stop_type:
            return safe, stopper.text_final
    return safe, ""


@pytest.mark.parametrize("prefix, suffix, generated, want", [
    # the suffix starts on the next line: cut before the newline that leads to it
    ("def f(x):\n    y = ", "\n    return y\n", "x + 1\n    return y\n", "x + 1"),
    # the cursor is at a line start and the suffix starts there: cut at the line start
    ("def f(x):\n", "    return y\n", "    y = x\n    return y + 0\n", "    y = x\n"),
    # the generated line equals the suffix's first non-empty line, after blank lines
    ("a = 1\n", "\n\nprint(a)\n", "b = 2\nprint(a)\n", "b = 2"),
])
def test_a_prefix_only_infill_stops_where_the_suffix_begins(prefix, suffix, generated, want):
    req = CompletionRequest(prefix=prefix, suffix=suffix, n_predict=-1)
    stopper = Stopper(req, [], prefix_only=True)
    safe, final = feed_text(stopper, generated)
    assert (stopper.stop_type, final) == ("word", want) and safe == len(want)


def test_a_prefix_only_infill_cut_when_one_token_brings_several_lines():
    req = CompletionRequest(prefix="a = 1\n", suffix="\nprint(a)\n", n_predict=-1)
    stopper = Stopper(req, [], prefix_only=True)
    stopper.feed(5, "b")
    stopper.feed(5, "b = 2\nprint(a)\nc")  # the line "b = 2" was open at the last call
    assert (stopper.stop_type, stopper.text_final) == ("word", "b = 2")


def test_a_prefix_only_infill_holds_back_a_line_that_may_become_the_suffix():
    req = CompletionRequest(prefix="x = 1\n", suffix="return x\n", n_predict=-1)
    stopper = Stopper(req, [], prefix_only=True)
    assert stopper.feed(5, "y = 2\nret") == len("y = 2\n")  # "ret" may be the start of "return x"
    assert stopper.feed(5, "y = 2\nretry()") == len("y = 2\nretry()") and not stopper.stop_type


def test_request_from_infill_body():
    req = CompletionRequest.from_infill({"input_prefix": "a", "input_suffix": "b", "prompt": "  c",
                                         "input_extra": [{"filename": "u.py", "text": "x"}], "stop": "\n\n",
                                         "n_predict": 16, "cache_prompt": True, "samplers": ["top_k"]})
    assert (req.prefix, req.suffix, req.prompt, req.extra, req.stop) == ("a", "b", "  c", (("u.py", "x"),), ("\n\n",))
    for body, field in (({"n_predict": "9"}, "n_predict"), ({"top_p": 0}, "top_p"), ({"n_indent": -1}, "n_indent"),
                        ({"input_extra": [{"filename": "x"}]}, "input_extra"), ({"temperature": True}, "temperature")):
        with pytest.raises(RequestError, match=field):
            CompletionRequest.from_infill(body)
    with pytest.raises(RequestError):
        CompletionRequest.from_infill(["not", "an", "object"])


def test_single_line_ends_at_once_on_a_newline(tok):
    _, st = run(tok, CompletionRequest(single_line=True, n_predict=-1), "\nimport sys\n")
    assert st.stop_type == "limit" and st.text_final == ""


def test_a_truncated_prefix_starts_at_the_same_place_while_the_user_types():
    """llama.vim sends the last 256 lines: as the cursor moves down, a cut at a fixed token count
    moves the prompt's start every request (nothing cached matches); the anchored cut does not."""
    import sysconfig

    from pltkit.model.paths import resolve_model_path
    from pltkit.runtime.completion import stable_tail

    tok = PLTTokenizer.from_dir(resolve_model_path("default"))
    lines = open(sysconfig.get_paths()["stdlib"] + "/textwrap.py").read().splitlines(keepends=True)
    starts, plain, sizes = [], [], []
    for k in range(200, 260):
        text = "".join(lines[max(0, k - 150):k])
        ids = tok.encode(text)
        kept = stable_tail(tok, text, ids, 300)
        assert 150 <= len(kept) <= 300 and text.endswith(tok.decode(kept))  # 3/4 of it, less a line
        starts.append(tok.decode(kept[:16]))
        sizes.append(len(kept))
        plain.append(ids[-300:][:16])
    moves = sum(a != b for a, b in zip(starts, starts[1:]))
    plain_moves = sum(a != b for a, b in zip(plain, plain[1:]))
    print(f"prompt start moved {moves} times in {len(starts) - 1} steps (fixed token cut: {plain_moves}); "
          f"kept {sum(sizes) / len(sizes):.0f} of 300 tokens on average")
    assert moves <= len(starts) // 3 and plain_moves > len(starts) * 3 // 4


def test_stop_strings_are_looked_for_only_at_the_tail():
    """Each feed looks for the stop strings in the new text and the longest stop's length before
    it, never again in the whole output; and it stops exactly where a full scan would."""
    import random

    class Seen(str):
        starts: list = []

        def find(self, sub, start=0, *rest):
            Seen.starts.append((len(self), start))
            return str.find(self, sub, start, *rest)

    rng = random.Random(5)
    for _ in range(300):
        stops = tuple("".join(rng.choice("ab\n") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3)))
        req = CompletionRequest(stop=stops, n_predict=-1)
        tail, text = Stopper(req, ()), ""
        Seen.starts = []
        while not tail.stop_type and len(text) < 60:
            text += rng.choice(["a", "b", "\n", "ab", "c"])
            shown = tail.feed(1, Seen(text))
            hits = [(text.find(s), s) for s in stops if s in text]
            if hits:  # a full scan stops at the first occurrence of any stop string
                assert (tail.stop_type, tail.text_final, tail.stopping_word) == ("word", text[:min(hits)[0]],
                                                                               min(hits)[1])
            else:
                assert tail.stop_type is None and not any(text[:shown].endswith(s) for s in stops)
        longest = max(map(len, stops))
        assert all(start >= n - 1 - longest - 4 - 2 for n, start in Seen.starts)


def test_stop_strings_are_capped():
    CompletionRequest(stop=("s" * 256,) * 64)
    for stop in (("x",) * 65, ("s" * 257,), ("",)):
        with pytest.raises(RequestError, match="at most 64 strings of 1 to 256"):
            CompletionRequest(stop=stop)


def test_clip_cuts_texts_where_the_context_cannot_reach():
    req = CompletionRequest(prefix="p" * 50, prompt="l" * 50, suffix="s" * 50, filename="f" * 50,
                            extra=(("a" * 50, "t" * 50), (None, "u" * 5)))
    cut, changed = clip(req, 10)
    assert changed and (cut.prefix, cut.prompt, cut.suffix, cut.filename) == ("p" * 10, "l" * 10, "s" * 10, "f" * 10)
    assert cut.extra == (("a" * 10, "t" * 10), (None, "u" * 5))
    assert clip(req, 50) == (req, False)


@pytest.mark.parametrize("fim", [True, False])
def test_clip_leaves_the_layout_as_it_was(fim):
    """Cut to context * max_token_chars characters, a request lays out as the whole one: the FIM
    layout (prefix tail, suffix head, extra chunks, file name) and the prefix-only one."""
    import copy
    import random
    import sysconfig

    from pltkit.model.paths import resolve_model_path

    tok = PLTTokenizer.from_dir(resolve_model_path("default"))
    if not fim:
        tok = copy.copy(tok)
        tok.fim = None
    rng = random.Random(0)
    deep = "".join("\n" + " " * rng.choice([40, 42, 44]) + rng.choice("abcxyz") for _ in range(4000))  # 16 chars/token
    code = open(sysconfig.get_paths()["stdlib"] + "/argparse.py").read() * 2 + deep
    context = 512
    chars = context * tok.max_token_chars
    for at in range(chars, len(code) - 3000, 39113):  # in the library's code and in the deep lines
        req = CompletionRequest(prefix=code[:at], prompt="    ", suffix=code[at:at + chars + 5000],
                                extra=(("a.py", code[:chars + 10]), ("b.py", code[at - 900:at])), filename="c.py")
        cut, changed = clip(req, chars)
        assert changed
        for budget in (context - 128, context - 1):
            whole, short = layout(tok, req, budget), layout(tok, cut, budget)
            assert (short.ids, short.marks, short.parts) == (whole.ids, whole.marks, whole.parts), (at, budget)
