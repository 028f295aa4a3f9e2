"""A grammar of its own for the symbolic shape expressions and guards of a ``torch.export`` program.

``torch.export.load`` turns each ``expr_str`` of a ``.pt2`` into sympy with ``sympy.sympify``,
which *evaluates* its string as Python, and ``ep.module()`` compiles the ``guards_code`` strings
with ``exec``. Both are attacker text in an uploaded program, so each is parsed here first, by a
tokenizer and a recursive-descent parser that never evaluates anything, and refused unless the
whole string fits a small grammar:

- shape expressions (``parse_shape_expression``): integers, symbols (``s52``, ``u0``), ``+ - * /
  // % **``, comparisons, ``& | ~``, calls of sympy's and torch's shape functions (``Max``,
  ``FloorDiv``, ``Mod``, ``Eq``, ...), and the ``srepr`` forms torch writes:
  ``Mul(Integer(64), Symbol('s52', positive=True, integer=True))``;
- guards (``parse_guard``): the Python torch's guard printer writes, i.e. the same arithmetic and
  functions over input sizes (``L['x'].size()[0]``, ``.stride()[i]``, ``.storage_offset()``) with
  ``and / or / not``; a guard must mention an input.

Anything else (another name, an attribute, a call of something outside the list, a keyword other
than a symbol's assumptions) raises ``ExpressionError`` naming the position. The parse tree is
returned (``Node``) so callers can ask which symbols an expression uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_LENGTH = 20_000
MAX_DEPTH = 50  # each level is ~10 Python frames: well inside the recursion limit
SYMBOL_NAME = re.compile(r"[a-z]{1,4}\d+")
FLOAT_TEXT = re.compile(r"-?\d+(\.\d+)?(e-?\d+)?")
CONSTANTS = {"true", "false", "True", "False", "oo", "int_oo"}
ASSUMPTIONS = {
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "infinite", "zero",
    "nonzero", "rational", "irrational", "even", "odd", "commutative", "extended_real", "extended_positive",
    "extended_negative", "extended_nonnegative", "extended_nonpositive", "extended_nonzero", "noninteger",
    "complex", "imaginary",
}
FUNCTIONS = {
    # sympy (srepr and str forms)
    "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "floor", "ceiling", "Eq", "Ne", "Lt", "Le", "Gt", "Ge",
    "Equality", "Unequality", "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan", "And", "Or",
    "Not", "Piecewise", "ExprCondPair",
    # torch.utils._sympy.functions, as the deserializer and the guard printer name them
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "TruncToFloat", "TruncToInt",
    "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "IsNonOverlappingAndDenseIndicator", "TrueDiv",
}
SOURCE_METHODS = {"size": True, "stride": True, "storage_offset": False}  # method -> indexed afterwards
TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>\d+(?:\.\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<string>'[^'\\\n]*')
  | (?P<op>\*\*|//|==|!=|<=|>=|[-+*/%<>(),=\[\].&|~])
""", re.VERBOSE)
COMPARISONS = {"==", "!=", "<", "<=", ">", ">="}


class ExpressionError(ValueError):
    """The text is not within the grammar; the message says where."""


@dataclass(frozen=True)
class Node:
    kind: str  # number, symbol, constant, source, call, unary, binary, compare, bool
    value: str = ""
    args: tuple[Node, ...] = ()


def parse_shape_expression(text: str) -> Node:
    """The parse tree of a program's ``expr_str`` (or range-constraint key); ExpressionError otherwise."""
    return _Parser(text, guard=False).parse()


def parse_guard(text: str) -> Node:
    """The parse tree of one ``guards_code`` entry; ExpressionError when it is not a shape check."""
    node = _Parser(text, guard=True).parse()
    if not any(n.kind == "source" for n in walk(node)):
        raise ExpressionError("a guard must check an input's size or stride")
    return node


def walk(node: Node):
    yield node
    for arg in node.args:
        yield from walk(arg)


def symbols(node: Node) -> set[str]:
    return {n.value for n in walk(node) if n.kind == "symbol"}


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"longer than {MAX_LENGTH} characters")
    tokens, position = [], 0
    while position < len(text):
        match = TOKEN.match(text, position)
        if not match:
            raise ExpressionError(f"unexpected character {text[position]!r} at {position}")
        if match.lastgroup != "space":
            tokens.append((match.lastgroup or "", match.group(), position))
        position = match.end()
    tokens.append(("end", "", len(text)))
    return tokens


class _Parser:
    def __init__(self, text: str, *, guard: bool) -> None:
        self.tokens = _tokenize(text)
        self.index = 0
        self.guard = guard
        self.depth = 0

    # -- token helpers ----------------------------------------------------------------------

    def peek(self, offset: int = 0) -> tuple[str, str, int]:
        return self.tokens[min(self.index + offset, len(self.tokens) - 1)]

    def take(self) -> tuple[str, str, int]:
        token = self.peek()
        self.index += 1
        return token

    def accept(self, value: str) -> bool:
        kind, text, _ = self.peek()
        if kind in ("op", "name") and text == value:
            self.index += 1
            return True
        return False

    def expect(self, value: str) -> None:
        if not self.accept(value):
            self.fail(f"expected {value!r}")

    def fail(self, why: str):
        kind, text, position = self.peek()
        found = "the end" if kind == "end" else repr(text)
        raise ExpressionError(f"{why}, found {found} at {position}")

    def nested(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExpressionError(f"nested deeper than {MAX_DEPTH}")

    # -- grammar ----------------------------------------------------------------------------

    def parse(self) -> Node:
        try:
            node = self.expression()
        except RecursionError:  # a caller already deep in its stack: still a refusal, never a crash
            raise ExpressionError("nested too deeply") from None
        if self.peek()[0] != "end":
            self.fail("expected the end of the expression")
        return node

    def expression(self) -> Node:
        self.nested()
        node = self.disjunction()
        self.depth -= 1
        return node

    def disjunction(self) -> Node:
        node = self.conjunction()
        while self.accept("or" if self.guard else "|"):
            node = Node("bool", "or", (node, self.conjunction()))
        return node

    def conjunction(self) -> Node:
        node = self.negation()
        while self.accept("and" if self.guard else "&"):
            node = Node("bool", "and", (node, self.negation()))
        return node

    def negation(self) -> Node:
        if self.accept("not" if self.guard else "~"):
            self.nested()
            node = Node("bool", "not", (self.negation(),))
            self.depth -= 1
            return node
        return self.comparison()

    def comparison(self) -> Node:
        node = self.arithmetic()
        operands, operators = [node], []
        while self.peek()[0] == "op" and self.peek()[1] in COMPARISONS:
            operators.append(self.take()[1])
            operands.append(self.arithmetic())
        return Node("compare", " ".join(operators), tuple(operands)) if operators else node

    def arithmetic(self) -> Node:
        node = self.term()
        while self.peek()[1] in ("+", "-") and self.peek()[0] == "op":
            operator = self.take()[1]
            node = Node("binary", operator, (node, self.term()))
        return node

    def term(self) -> Node:
        node = self.unary()
        while self.peek()[0] == "op" and self.peek()[1] in ("*", "/", "//", "%"):
            operator = self.take()[1]
            node = Node("binary", operator, (node, self.unary()))
        return node

    def unary(self) -> Node:
        if self.peek()[0] == "op" and self.peek()[1] in ("-", "+"):
            operator = self.take()[1]
            self.nested()
            node = Node("unary", operator, (self.unary(),))
            self.depth -= 1
            return node
        node = self.atom()
        if self.accept("**"):
            self.nested()
            node = Node("binary", "**", (node, self.unary()))
            self.depth -= 1
        return node

    def atom(self) -> Node:
        kind, text, _ = self.peek()
        if kind == "number":
            self.take()
            return Node("number", text)
        if kind == "op" and text == "(":
            self.take()
            node = self.expression()
            self.expect(")")
            return node
        if kind != "name":
            self.fail("expected a number, a symbol or a function")
        if text in ("and", "or", "not"):
            self.fail("unexpected keyword")
        if self.peek(1)[1] == "(" and self.peek(1)[0] == "op":
            return self.call()
        if self.guard and text == "L":
            return self.source()
        self.take()
        if text in CONSTANTS:
            return Node("constant", text)
        if not self.guard and SYMBOL_NAME.fullmatch(text):
            return Node("symbol", text)
        self.index -= 1
        self.fail("unknown name")
        raise AssertionError  # unreachable: fail raises

    def call(self) -> Node:
        name = self.take()[1]
        self.take()  # "("
        if name == "Symbol" and not self.guard:
            return self.symbol_call()
        if name == "Integer" and not self.guard:
            value = self.signed_integer()
            self.expect(")")
            return Node("number", value)
        if name == "Rational" and not self.guard:
            numerator = self.signed_integer()
            self.expect(",")
            denominator = self.signed_integer()
            self.expect(")")
            return Node("binary", "/", (Node("number", numerator), Node("number", denominator)))
        if name == "Float" and not self.guard:
            return self.float_call()
        if name not in FUNCTIONS:
            self.index -= 2
            self.fail(f"{name!r} is not a shape function")
        args = [self.expression()]
        while self.accept(","):
            args.append(self.expression())
        self.expect(")")
        return Node("call", name, tuple(args))

    def signed_integer(self) -> str:
        sign = "-" if self.accept("-") else ""
        kind, text, _ = self.peek()
        if kind != "number" or "." in text:
            self.fail("expected an integer")
        self.take()
        return sign + text

    def string(self) -> str:
        kind, text, _ = self.peek()
        if kind != "string":
            self.fail("expected a quoted name")
        self.take()
        return text[1:-1]

    def symbol_call(self) -> Node:
        name = self.string()
        if not SYMBOL_NAME.fullmatch(name):
            self.index -= 1
            self.fail("a symbol is a short lowercase prefix and a number")
        while self.accept(","):
            kind, keyword, _ = self.peek()
            if kind != "name" or keyword not in ASSUMPTIONS:
                self.fail("expected a symbol assumption")
            self.take()
            self.expect("=")
            if not (self.accept("True") or self.accept("False")):
                self.fail("expected True or False")
        self.expect(")")
        return Node("symbol", name)

    def float_call(self) -> Node:
        value = self.string()
        if not FLOAT_TEXT.fullmatch(value):
            self.index -= 1
            self.fail("expected a decimal number")
        if self.accept(","):
            self.expect("precision")
            self.expect("=")
            self.signed_integer()
        self.expect(")")
        return Node("number", value)

    def source(self) -> Node:
        """``L['x']`` / ``L[0]`` (any depth), then ``.size()[i]``, ``.stride()[i]`` or ``.storage_offset()``."""
        self.take()  # L
        path = []
        while self.accept("["):
            kind, text, _ = self.peek()
            if kind not in ("string", "number") or (kind == "number" and "." in text):
                self.fail("expected an input name or index")
            self.take()
            path.append(text)
            self.expect("]")
        if not path:
            self.fail("expected '[' after L")
        if self.accept("."):
            kind, method, _ = self.peek()
            if kind != "name" or method not in SOURCE_METHODS:
                self.fail("only .size(), .stride() and .storage_offset() may follow an input")
            self.take()
            self.expect("(")
            self.expect(")")
            path.append(f".{method}()")
            if SOURCE_METHODS[method]:
                self.expect("[")
                index = self.signed_integer()
                self.expect("]")
                path.append(f"[{index}]")
        return Node("source", "".join(path))
