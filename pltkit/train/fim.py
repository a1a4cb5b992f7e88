"""Fill-in-the-middle training examples (step 5 of the data recipe in pltkit.train.data): a
chunk of code becomes prefix-suffix-middle parts, its middle cut where an editor's cursor would be."""

from __future__ import annotations

import numpy as np

from pltkit.train.data import EOT, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX

# Middle-span mix of FIM examples; the rest of the probability mass picks one line.
_RANDOM_SPAN_RATE = 0.2
_MULTI_LINE_RATE = 0.3
_MAX_MIDDLE_LINES = 8


Part = int | str | np.ndarray
"""One piece of an example: a special token id, text to tokenize, or token ids."""


def fim_transform(
    text: str, rng: np.random.Generator, fim_rate: float = 0.5, ids: np.ndarray | None = None
) -> list[Part]:
    """Turn one chunk into a training example, as a list of parts.

    With probability ``fim_rate`` the example is prefix-suffix-middle:
    ``[FIM_PREFIX, P, FIM_SUFFIX, S, FIM_MIDDLE, M, EOT]`` with P + M + S ==
    ``text``; otherwise it is ``[text, EOT]``, where ``ids`` (the chunk's
    tokens, if given) stand in for ``text`` to save tokenizing it again.
    """
    if rng.random() >= fim_rate:
        return [text if ids is None else ids, EOT]
    start, end = fim_middle_span(text, rng)
    return [FIM_PREFIX, text[:start], FIM_SUFFIX, text[end:], FIM_MIDDLE, text[start:end], EOT]


def fim_middle_span(text: str, rng: np.random.Generator) -> tuple[int, int]:
    """Character span ``(start, end)`` of the middle of a FIM example.

    The split is made on characters, not tokens, because an editor's cursor
    can be anywhere, including inside what would be one token: a model
    trained only on token-aligned prefixes has never seen a prefix ending in
    ``ret`` and completes it badly. The span mimics what code-completion
    clients ask for: they send whole lines around the cursor as prefix and
    suffix and want the rest of the current line or a few lines after it.

    - most often (50 %) the rest of one line: the cursor falls anywhere from
      the end of the line's indentation (a whole new line after the editor
      auto-indented) to just before the line's last character (a partial
      line), and the middle ends before the newline, so the suffix starts
      with the newline as it does in an editor;
    - often (30 %) the same from the cursor to the end of a line 2 to 8 lines
      down, for multi-line completions such as a block body;
    - sometimes (20 %) a uniformly random character span, the original FIM
      recipe (Bavarian et al., 2022), which covers long middles and middles
      that end inside a line (text after the cursor, such as closing brackets).

    Lines are picked among non-blank lines; a chunk without one gets a random span.
    """
    mode = rng.random()
    lines = _nonblank_lines(text)
    if mode < _RANDOM_SPAN_RATE or not lines:
        return _random_span(len(text), rng)
    n_lines = 1 if mode < 1 - _MULTI_LINE_RATE else int(rng.integers(2, _MAX_MIDDLE_LINES + 1))
    first = int(rng.integers(len(lines)))
    line_start, line_end = lines[first]
    line = text[line_start:line_end]
    indent_end = line_start + len(line) - len(line.lstrip())
    start = int(rng.integers(indent_end, line_end))
    end = _line_end(text, line_end, n_lines - 1)
    return start, end


def _nonblank_lines(text: str) -> list[tuple[int, int]]:
    """(start, end) of each line with non-whitespace text, newline excluded."""
    spans, start = [], 0
    for line in text.split("\n"):
        if line.strip():
            spans.append((start, start + len(line)))
        start += len(line) + 1
    return spans


def _line_end(text: str, pos: int, lines_down: int) -> int:
    """End (before the newline) of the line ``lines_down`` lines below the one ending at ``pos``."""
    for _ in range(lines_down):
        if pos == len(text):
            break
        newline = text.find("\n", pos + 1)
        pos = len(text) if newline < 0 else newline
    return pos


def _random_span(length: int, rng: np.random.Generator) -> tuple[int, int]:
    start, end = sorted(int(x) for x in rng.integers(0, length + 1, size=2))
    return start, end
