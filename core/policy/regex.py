"""Regex analysis shared by the policy compiler: one parsed pattern, three renderings.

A rule's pattern is parsed once with Python's own parser (`re._parser`) and rendered back as
text for two engines that must agree on what it means:

- the *exact* pattern, rendered for Python `re` (which decides every match, leftmost-first) and
  for hyperscan (which only says *that* a rule matched somewhere, so Python runs on hits only);
- the *prefix* pattern (hyperscan only): any non-empty prefix of a possible match, anchored at the
  end of the scanned text. The stream filter asks it "could some match still be growing at the end
  of what I have?" to hold back only the text that could still become part of a match.
- the *trigger* pattern (hyperscan only): the shortest start every match has (trailing optional
  parts and assertions dropped, the last repeat cut to its minimum). It tells the stream filter
  that a rule may have matched, no later than the match ends; Python then finds the exact match.
  An exact automaton for a wide bounded repeat is huge: the `generic_secret` preset's `{12,200}`
  failed ("Pattern is too large") after 1.3 s of compiling, `private_key`'s `{0,4000}` took 0.5 s;
  their triggers compile in milliseconds.

Both engines use ASCII semantics (`\\w`, `\\d`, `\\b`, case folding) so their languages agree;
hyperscan must accept a superset of what Python matches, never a subset. Open-ended repetitions
(`+`, `*`, `{n,}`) are capped at the rule's declared `max_len`, so every match has a known
maximum width: the hold-back bound.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from re import _constants as C  # type: ignore[attr-defined]
from re import _parser as P  # type: ignore[attr-defined]
from typing import Any

# Largest match width (characters) a rule may have; beyond this the stream hold-back would be
# longer than most responses, which defeats streaming.
MAX_WIDTH = 16_384

_CATEGORIES = {
    C.CATEGORY_DIGIT: r"\d",
    C.CATEGORY_NOT_DIGIT: r"\D",
    C.CATEGORY_SPACE: r"\s",
    C.CATEGORY_NOT_SPACE: r"\S",
    C.CATEGORY_WORD: r"\w",
    C.CATEGORY_NOT_WORD: r"\W",
}
_FLAG_LETTERS = ((re.IGNORECASE, "i"), (re.DOTALL, "s"), (re.MULTILINE, "m"))


class PatternError(ValueError):
    """A pattern the streaming matcher cannot use; the message says why and what to do."""


@dataclass(frozen=True)
class Analysed:
    """One pattern after analysis: renderings for both engines plus its width bounds."""

    python: str  # for re.compile(..., re.ASCII | flags)
    hyperscan: str  # exact language (a reference rendering; the stream database compiles `trigger`)
    prefix: str | None  # non-empty prefixes of a match, anchored at the end (`\z`); None: none exist
    min_width: int
    max_width: int
    caseless: bool
    dotall: bool
    multiline: bool
    trigger: str = ""  # every match starts with a match of this; for the stream database

    def python_flags(self) -> int:
        flags = re.ASCII
        if self.caseless:
            flags |= re.IGNORECASE
        if self.dotall:
            flags |= re.DOTALL
        if self.multiline:
            flags |= re.MULTILINE
        return flags


def _char(code: int, in_class: bool) -> str:
    if code < 0x80:
        ch = chr(code)
        if ch.isalnum() and not in_class:
            return ch
        return f"\\x{code:02x}"
    return chr(code)


def _in(items: list[tuple[Any, Any]]) -> str:
    parts: list[str] = []
    for op, av in items:
        if op is C.NEGATE:
            parts.insert(0, "^")
        elif op is C.LITERAL:
            parts.append(_char(av, True))
        elif op is C.RANGE:
            parts.append(f"{_char(av[0], True)}-{_char(av[1], True)}")
        elif op is C.CATEGORY:
            parts.append(_CATEGORIES[av])
        else:  # pragma: no cover - the parser emits nothing else inside a set
            raise PatternError(f"unsupported item {op} in a character set")
    return "[" + "".join(parts) + "]"


class _Renderer:
    """Renders a parsed pattern for one dialect ("python" or "hyperscan")."""

    def __init__(self, dialect: str, relax: bool = False, multiline: bool = False) -> None:
        self.dialect = dialect
        self.multiline = multiline
        # relax: bounded repeats become unbounded (a superset). Used for the prefix pattern,
        # which hyperscan can only compile with start-of-match tracking when repeats are open.
        self.relax = relax

    def seq(self, items: list[tuple[Any, Any]]) -> str:
        return "".join(self.node(op, av) for op, av in items)

    def node(self, op: Any, av: Any) -> str:
        if op is C.LITERAL:
            return _char(av, False)
        if op is C.NOT_LITERAL:
            return "[^" + _char(av, True) + "]"
        if op is C.ANY:
            return "."
        if op is C.IN:
            return _in(av)
        if op is C.BRANCH:
            return "(?:" + "|".join(self.seq(list(alt)) for alt in av[1]) + ")"
        if op is C.SUBPATTERN:
            _group, add, delete, sub = av
            return "(?" + _flag_prefix(add, delete) + ":" + self.seq(list(sub)) + ")"
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):
            lo, hi, sub = av
            inner = "(?:" + self.seq(list(sub)) + ")"
            if self.relax:
                quant = "*"
            elif hi is C.MAXREPEAT:
                quant = f"{{{lo},}}"
            else:
                quant = f"{{{lo},{hi}}}"
            lazy = "?" if op is C.MIN_REPEAT and self.dialect == "python" and not self.relax else ""
            return inner + quant + lazy
        if op is C.AT:
            return self.at(av)
        raise PatternError(_unsupported(op))

    def at(self, av: Any) -> str:
        table = {
            C.AT_BEGINNING: "^",
            C.AT_BEGINNING_STRING: r"\A",
            # Without MULTILINE, `$` also matches before a final newline, which depends on whether more
            # text follows; the stream filter cannot know that, so `$` means end of text here.
            C.AT_END: "$" if self.multiline else (r"\Z" if self.dialect == "python" else r"\z"),
            C.AT_END_STRING: r"\Z" if self.dialect == "python" else r"\z",
            C.AT_BOUNDARY: r"\b",
            C.AT_NON_BOUNDARY: r"\B",
        }
        if av not in table:
            raise PatternError(f"unsupported anchor {av}")
        return table[av]


def _flag_prefix(add: int, delete: int) -> str:
    on = "".join(letter for flag, letter in _FLAG_LETTERS if add & flag)
    off = "".join(letter for flag, letter in _FLAG_LETTERS if delete & flag)
    return on + ("-" + off if off else "")


def _unsupported(op: Any) -> str:
    name = str(op)
    if name in ("ASSERT", "ASSERT_NOT"):
        what = "lookahead/lookbehind assertions"
    elif name in ("GROUPREF", "GROUPREF_EXISTS"):
        what = "backreferences"
    elif name in ("ATOMIC_GROUP", "POSSESSIVE_REPEAT"):
        what = "atomic groups and possessive quantifiers"
    else:
        what = f"the construct {name}"
    return (
        f"{what} are not supported: the streaming matcher needs a plain regular expression. "
        "Rewrite the pattern without them (use \\b for word boundaries)."
    )


def _cap(items: list[tuple[Any, Any]], cap: int | None) -> tuple[list[tuple[Any, Any]], bool]:
    """Copy of the parse tree with open-ended repeats capped at `cap`; also says if any were open."""
    out: list[tuple[Any, Any]] = []
    unbounded = False
    for op, av in items:
        if op is C.BRANCH:
            alts = []
            for alt in av[1]:
                sub, u = _cap(list(alt), cap)
                unbounded |= u
                alts.append(sub)
            out.append((op, (av[0], alts)))
        elif op is C.SUBPATTERN:
            sub, u = _cap(list(av[3]), cap)
            unbounded |= u
            out.append((op, (av[0], av[1], av[2], sub)))
        elif op in (C.MAX_REPEAT, C.MIN_REPEAT):
            lo, hi, inner = av
            sub, u = _cap(list(inner), cap)
            unbounded |= u
            if hi is C.MAXREPEAT:
                unbounded = True
                if cap is not None:
                    hi = max(lo, cap)
            out.append((op, (lo, hi, sub)))
        elif op in (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN, C.AT):
            out.append((op, av))
        else:
            raise PatternError(_unsupported(op))
    return out, unbounded


def _width(items: list[tuple[Any, Any]]) -> tuple[int, int]:
    lo = hi = 0
    for op, av in items:
        if op in (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN):
            lo, hi = lo + 1, hi + 1
        elif op is C.BRANCH:
            widths = [_width(list(alt)) for alt in av[1]]
            lo += min(w[0] for w in widths)
            hi += max(w[1] for w in widths)
        elif op is C.SUBPATTERN:
            a, b = _width(list(av[3]))
            lo, hi = lo + a, hi + b
        elif op in (C.MAX_REPEAT, C.MIN_REPEAT):
            a, b = _width(list(av[2]))
            lo += a * av[0]
            hi += b * (av[1] if av[1] is not C.MAXREPEAT else MAX_WIDTH * 1000)
    return lo, hi


class _Prefix:
    """Non-empty prefixes of a pattern's matches (relaxed to a superset), as hyperscan text."""

    def __init__(self) -> None:
        self.full = _Renderer("hyperscan", relax=True)

    def seq(self, items: list[tuple[Any, Any]]) -> str | None:
        if not items:
            return None
        (op, av), rest_items = items[0], items[1:]
        first = self.node(op, av)
        rest = self.seq(rest_items)
        head = self.full.node(op, av)
        if rest is None:
            return first
        if first is None:
            return head + "(?:" + rest + ")"
        if first == head:  # a single-character head: "a" | "a rest" == "a(?:rest)?"
            return head + "(?:" + rest + ")?"
        return "(?:" + first + "|" + head + "(?:" + rest + "))"

    def node(self, op: Any, av: Any) -> str | None:
        if op in (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN):
            return self.full.node(op, av)
        if op is C.AT:
            return None  # zero-width: contributes no characters of its own
        if op is C.BRANCH:
            alts = [p for p in (self.seq(list(alt)) for alt in av[1]) if p is not None]
            return "(?:" + "|".join(alts) + ")" if alts else None
        if op is C.SUBPATTERN:
            inner = self.seq(list(av[3]))
            return None if inner is None else "(?" + _flag_prefix(av[1], av[2]) + ":" + inner + ")"
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):
            _lo, hi, sub = av
            inner = self.seq(list(sub))
            if inner is None or hi == 0:
                return None
            if hi == 1:
                return inner
            return "(?:" + self.full.seq(list(sub)) + ")*(?:" + inner + ")"
        raise PatternError(_unsupported(op))


def _trigger(items: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """A prefix every match has: trailing items that can be empty dropped, the last repeat cut to its minimum.

    Every match of the pattern begins with a match of the result, so a hit on the result comes no later than
    the match's end (the stream filter then lets Python find the match itself). Items must not match empty
    as a whole (analyse() refuses such patterns).
    """
    out = list(items)
    while len(out) > 1 and _width([out[-1]])[0] == 0:
        out.pop()
    op, av = out[-1]
    if op in (C.MAX_REPEAT, C.MIN_REPEAT):
        lo, _hi, sub = av
        out[-1] = (op, (lo, lo, sub))
    elif op is C.SUBPATTERN:
        out[-1] = (op, (av[0], av[1], av[2], _trigger(list(av[3]))))
    elif op is C.BRANCH:
        out[-1] = (op, (av[0], [_trigger(list(alt)) for alt in av[1]]))
    return out


def analyse(pattern: str, *, caseless: bool, max_len: int | None) -> Analysed:
    """Parse, cap and render `pattern`; raise PatternError naming what is wrong and the fix."""
    try:
        parsed = P.parse(pattern, 0)
    except re.error as exc:
        raise PatternError(f"not a valid regular expression: {exc}") from exc
    gflags = parsed.state.flags
    if gflags & re.VERBOSE:
        gflags &= ~re.VERBOSE
    caseless = caseless or bool(gflags & re.IGNORECASE)
    items, unbounded = _cap(list(parsed.data), max_len)
    if unbounded and max_len is None:
        raise PatternError(
            "the pattern can match text of unbounded length (it uses `+`, `*` or `{n,}`); declare `max_len:` "
            "(the longest run, in characters, any open-ended repetition may match) so the stream hold-back "
            "stays bounded, or use bounded repeats like `{1,64}`"
        )
    lo, hi = _width(items)
    if lo == 0:
        raise PatternError("the pattern can match empty text; make at least one character required")
    if hi > MAX_WIDTH:
        raise PatternError(
            f"the longest possible match is {hi} characters, above the limit of {MAX_WIDTH}; "
            "use smaller repeat bounds or a smaller `max_len`"
        )
    prefix = _Prefix().seq(items)
    multiline = bool(gflags & re.MULTILINE)
    return Analysed(
        python=_Renderer("python", multiline=multiline).seq(items),
        hyperscan=_Renderer("hyperscan", multiline=multiline).seq(items),
        prefix=None if prefix is None else "(?:" + prefix + r")\z",
        min_width=lo,
        max_width=hi,
        caseless=caseless,
        dotall=bool(gflags & re.DOTALL),
        multiline=multiline,
        trigger=_Renderer("hyperscan", multiline=multiline).seq(_trigger(items)),
    )


def keywords_pattern(keywords: list[str], *, whole_word: bool) -> str:
    """A regex for any of `keywords` (longest first, so "password" wins over "pass")."""
    alts = []
    for kw in sorted({k.strip() for k in keywords if k.strip()}, key=lambda k: (-len(k), k)):
        pieces = []
        for word in kw.split():
            pieces.append("".join(ch if ch.isascii() and ch.isalnum() else _char(ord(ch), False) for ch in word))
        # Whitespace inside a phrase matches any short run of whitespace (a newline, two spaces).
        alt = r"\s{1,8}".join(pieces)
        if whole_word:
            # \b only beside word characters: "c++" must still match before a space.
            alt = (r"\b" if _is_word(kw[0]) else "") + alt + (r"\b" if _is_word(kw[-1]) else "")
        alts.append(alt)
    return "(?:" + "|".join(alts) + ")"


def _is_word(ch: str) -> bool:
    return ch.isascii() and (ch.isalnum() or ch == "_")
