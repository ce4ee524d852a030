"""The subset of OData v4.01 that v4 list calls accept in `$filter` and `$orderby`.

Prism Central evaluates `$filter` on the server and refuses what it cannot evaluate with a
400, so the stand-in parses the expression and refuses unknown properties, unknown
functions and malformed input the same way instead of ignoring them. Supported:
`eq ne gt ge lt le`, `and or not`, parentheses, `startswith/endswith/contains(prop, 'x')`,
string literals with '' escapes, numbers, true/false/null and enum literals written
`Vmm.Ahv.Config.PowerState'ON'` (compared by their value).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Getter = Callable[[Mapping[str, Any]], Any]
Predicate = Callable[[Mapping[str, Any]], bool]


class ODataError(ValueError):
    """The expression is malformed or uses something the resource cannot filter on."""


_TOKEN = re.compile(r"""
    \s*(?:
      (?P<string>'(?:[^']|'')*')
    | (?P<enum>[A-Za-z_][\w.]*'(?:[^']|'')*')
    | (?P<number>-?\d+(?:\.\d+)?)
    | (?P<lparen>\() | (?P<rparen>\)) | (?P<comma>,)
    | (?P<word>[A-Za-z_$][\w/$]*)
    )""", re.VERBOSE)

_COMPARISONS = {"eq", "ne", "gt", "ge", "lt", "le"}
_FUNCTIONS = {"startswith", "endswith", "contains"}


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        match = _TOKEN.match(text, position)
        if not match or match.end() == position:
            raise ODataError(f"unexpected character at position {position}: "
                             f"{text[position:position + 10]!r}")
        kind = match.lastgroup or ""
        tokens.append(_Token(kind, match.group(kind)))
        position = match.end()
    return tokens


def _literal(token: _Token) -> Any:
    if token.kind == "string":
        return token.text[1:-1].replace("''", "'")
    if token.kind == "enum":
        return token.text[token.text.index("'") + 1:-1].replace("''", "'")
    if token.kind == "number":
        return float(token.text) if "." in token.text else int(token.text)
    if token.kind == "word" and token.text in ("true", "false"):
        return token.text == "true"
    if token.kind == "word" and token.text == "null":
        return None
    raise ODataError(f"expected a literal, found {token.text!r}")


def _compare(op: str, left: Any, right: Any) -> bool:
    if op == "eq":
        return bool(left == right)
    if op == "ne":
        return bool(left != right)
    if left is None or right is None:
        return False
    try:
        if op == "gt":
            return bool(left > right)
        if op == "ge":
            return bool(left >= right)
        if op == "lt":
            return bool(left < right)
        return bool(left <= right)
    except TypeError:
        return False


class _Parser:
    def __init__(self, text: str, fields: Mapping[str, Getter]) -> None:
        self.tokens = _tokenize(text)
        self.position = 0
        self.fields = fields

    def peek(self) -> _Token | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self, kind: str | None = None, text: str | None = None) -> _Token:
        token = self.peek()
        if token is None:
            raise ODataError("unexpected end of expression")
        if (kind and token.kind != kind) or (text and token.text != text):
            raise ODataError(f"unexpected {token.text!r}")
        self.position += 1
        return token

    def field(self, name: str) -> Getter:
        if name not in self.fields:
            raise ODataError(f"property '{name}' cannot be used in $filter; filterable: "
                             + ", ".join(sorted(self.fields)))
        return self.fields[name]

    def parse(self) -> Predicate:
        if not self.tokens:
            raise ODataError("empty expression")
        predicate = self.disjunction()
        if self.peek() is not None:
            raise ODataError(f"unexpected {self.take().text!r}")
        return predicate

    def disjunction(self) -> Predicate:
        parts = [self.conjunction()]
        while (token := self.peek()) and token.kind == "word" and token.text == "or":
            self.take()
            parts.append(self.conjunction())
        return parts[0] if len(parts) == 1 else lambda item: any(p(item) for p in parts)

    def conjunction(self) -> Predicate:
        parts = [self.unary()]
        while (token := self.peek()) and token.kind == "word" and token.text == "and":
            self.take()
            parts.append(self.unary())
        return parts[0] if len(parts) == 1 else lambda item: all(p(item) for p in parts)

    def unary(self) -> Predicate:
        token = self.peek()
        if token and token.kind == "word" and token.text == "not":
            self.take()
            inner = self.unary()
            return lambda item: not inner(item)
        return self.primary()

    def primary(self) -> Predicate:
        token = self.take()
        if token.kind == "lparen":
            inner = self.disjunction()
            self.take("rparen")
            return inner
        if token.kind != "word":
            raise ODataError(f"expected a property or function, found {token.text!r}")
        following = self.peek()
        if following and following.kind == "lparen":
            return self.function(token.text)
        getter = self.field(token.text)
        op = self.take("word")
        if op.text not in _COMPARISONS:
            raise ODataError(f"unknown operator {op.text!r}")
        value = _literal(self.take())
        return lambda item: _compare(op.text, getter(item), value)

    def function(self, name: str) -> Predicate:
        if name not in _FUNCTIONS:
            raise ODataError(f"unknown function {name!r}")
        self.take("lparen")
        getter = self.field(self.take("word").text)
        self.take("comma")
        value = _literal(self.take())
        self.take("rparen")
        if not isinstance(value, str):
            raise ODataError(f"{name} takes a string literal")

        def test(item: Mapping[str, Any]) -> bool:
            actual = getter(item)
            if not isinstance(actual, str):
                return False
            if name == "startswith":
                return actual.startswith(value)
            if name == "endswith":
                return actual.endswith(value)
            return value in actual

        return test


def parse_filter(text: str, fields: Mapping[str, Getter]) -> Predicate:
    """Compile `$filter` text into a predicate over rendered entities, or raise ODataError."""
    return _Parser(text, fields).parse()


def parse_orderby(text: str, fields: Mapping[str, Getter]) -> list[tuple[Getter, bool]]:
    """Compile `$orderby` ("name desc, extId") into (getter, descending) pairs."""
    keys: list[tuple[Getter, bool]] = []
    for part in text.split(","):
        words = part.split()
        if not words or len(words) > 2 or (len(words) == 2 and words[1] not in ("asc", "desc")):
            raise ODataError(f"invalid $orderby clause {part.strip()!r}")
        if words[0] not in fields:
            raise ODataError(f"property '{words[0]}' cannot be used in $orderby; sortable: "
                             + ", ".join(sorted(fields)))
        keys.append((fields[words[0]], len(words) == 2 and words[1] == "desc"))
    return keys
