"""When a completion stops, token by token: end-of-generation tokens, stop strings (held back
while they may still match), single_line and n_indent, n_predict, and an infill served without
FIM tokens reaching its suffix. Also the trim of a completion that re-types the suffix.
"""

from __future__ import annotations

from pltkit.runtime.completion import CompletionRequest


class Stopper:
    """Decides, token by token, what text may be shown and whether to stop.

    feed(token, text) takes each new token id and the decoded text of all generated tokens;
    it returns the length of `text` that is safe to show (a possible start of a stop string is
    held back) and sets `stop_type` ("eos", "word", "limit") and `stopping_word` when done,
    with `text_final` the completion to report."""

    def __init__(self, req: CompletionRequest, end_ids, prefix_only: bool = False):
        """prefix_only: an infill served without FIM tokens, as a plain continuation of the
        prefix; it stops where the generated text reaches the suffix (suffix_cut)."""
        self.req, self.end_ids = req, set(end_ids)
        self.anchor = _suffix_anchor(req.suffix) if prefix_only else None
        self._scanned = 0  # where _suffix_cut starts looking for lines
        self._checked = 0  # length of the text the stop strings were looked for in
        self._longest = max(map(len, req.stop), default=0)
        self.stop_type: str | None = None
        self.stopping_word = ""
        self.text_final = ""
        self.n = 0

    def _done(self, kind: str, text: str, word: str = "") -> int:
        self.stop_type, self.stopping_word, self.text_final = kind, word, text
        return len(text)

    def feed(self, token: int, text: str) -> int:
        self.n += 1
        if token in self.end_ids:
            return self._done("eos", text)
        # a stop string inside the text that earlier calls saw would have stopped them: look only
        # at the new text and the longest stop string's length before it (plus a few characters
        # that the end of a multi-byte character may have changed)
        start = max(0, self._checked - self._longest - 4)
        self._checked = len(text)
        hits = [(at, s) for s in self.req.stop if (at := text.find(s, start)) >= 0]
        if hits:
            at, word = min(hits)
            return self._done("word", text[:at], word)
        cut = self._line_rule(text)
        if cut is not None:
            return self._done("limit", text[:cut])
        if self.anchor is not None:
            cut = self._suffix_cut(text)
            if cut is not None:
                return self._done("word", text[:cut], self.anchor[1])
        if self.req.n_predict >= 0 and self.n >= self.req.n_predict:
            return self._done("limit", text)
        safe = len(text) - _held_back(text, self.req.stop)
        if self.anchor is not None:  # a line that may become the suffix's first line
            start = self._line_start(text, len(text))
            if start is not None and self.anchor[1].startswith(text[start:].lstrip(" \t")):
                safe = min(safe, start - 1 if self.anchor[0] and start > 0 else start)
        if self.req.n_indent > 0:  # a new line's indentation is unknown until its text starts
            nl = text.rfind("\n")
            if nl >= 0 and not text[nl + 1:].strip():
                safe = min(safe, nl)
        return safe

    def _line_rule(self, text: str) -> int | None:
        """single_line: the rest of the current line, up to the first newline. n_indent: stop
        before a new line that is indented less than n_indent."""
        if self.req.single_line and "\n" in text:
            return text.find("\n")
        if self.req.n_indent > 0:
            start = 0
            while (nl := text.find("\n", start)) >= 0:
                line_start = nl + 1
                line = text[line_start:]
                body = line.lstrip(" \t")
                if body and len(line) - len(body) < self.req.n_indent:  # indent known once text starts
                    return nl
                start = line_start
        return None

    def _line_start(self, text: str, end: int) -> int | None:
        """Where the line holding text[end - 1] starts; None for the first line of a completion
        that started mid-line (the cursor's line)."""
        nl = text.rfind("\n", 0, end)
        if nl >= 0:
            return nl + 1
        before = self.req.prefix + self.req.prompt
        return 0 if not before or before.endswith("\n") else None

    def _suffix_cut(self, text: str) -> int | None:
        """The end of the completion when a generated line reaches the suffix's first non-empty
        line (the model going on into text that is already there); before the newline when the
        suffix brings its own."""
        newline_first, first = self.anchor
        # called at every token: lines before the one the previous text ended in were checked then
        starts = [0] if self._scanned == 0 and self._line_start(text, 0) == 0 else []
        starts += [i + 1 for i in range(self._scanned, len(text)) if text[i] == "\n"]
        self._scanned = max(text.rfind("\n"), 0)
        for start in starts:
            if text[start:].lstrip(" \t").startswith(first):
                return start - 1 if newline_first and start > 0 else start
        return None

    def context_full(self, text: str) -> int:
        return self._done("limit", text)

    def time_out(self, text: str) -> int:
        return self._done("time", text[:len(text) - _held_back(text, self.req.stop)])


def _suffix_anchor(suffix: str | None) -> tuple[bool, str] | None:
    """(whether a newline comes before it, the suffix's first non-empty line, stripped)."""
    for i, line in enumerate((suffix or "").split("\n")):
        if line.strip():
            return i > 0, line.strip()
    return None


def _held_back(text: str, stops) -> int:
    """How many trailing characters of text could begin a stop string: the longest s[:k] (k <
    len(s)) that text ends with, trying only the k where s[k - 1] is text's last character."""
    held = 0
    for s in stops if text else ():
        end = min(len(s) - 1, len(text))
        while (i := s.rfind(text[-1], 0, end)) >= held:  # a candidate longer than `held`
            if text.endswith(s[:i + 1]):
                held = i + 1
                break
            end = i
    return held


def trim_suffix_repeat(text: str, suffix: str | None) -> str:
    """Drop the end of a completion that merely repeats the start of the text after the cursor
    (the model re-typing what is already there)."""
    if not suffix or not text:
        return text
    for k in range(min(len(text), len(suffix)), 0, -1):
        if text.endswith(suffix[:k]) and suffix[:k].strip():
            return text[:-k]
    return text
