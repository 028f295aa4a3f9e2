"""The shape-expression and guard grammar: what torch.export writes is accepted, nothing else is.

The accepted strings are copied from real ``.pt2`` files (a GRU + attention model, ResNet, programs
with derived and constrained dims). The refused ones are what a crafted program would put there for
``sympify`` or ``exec`` to run.
"""

from __future__ import annotations

import re

import pytest

from worker.support.sym_expr import ExpressionError, parse_guard, parse_shape_expression, symbols

SYMBOL = "Symbol('s52', positive=True, integer=True)"


@pytest.mark.parametrize(("text", "used"), [
    (f"Mul(Integer(64), {SYMBOL})", {"s52"}),
    (f"Mul(Integer(4), Min(Integer(16), Mul(Integer(64), {SYMBOL})))", {"s52"}),
    (f"FloorDiv({SYMBOL}, FloorDiv({SYMBOL}, Integer(2)))", {"s52"}),
    (f"Add({SYMBOL}, Integer(-1))", {"s52"}),
    (f"LessThan({SYMBOL}, Integer(1024))", {"s52"}),
    (f"And(StrictGreaterThan({SYMBOL}, Integer(2)), Equality(Mod({SYMBOL}, Integer(8)), Integer(0)))", {"s52"}),
    (f"Pow({SYMBOL}, Integer(2))", {"s52"}),
    ("Max(Integer(1), Symbol('u0', integer=True))", {"u0"}),
    ("Rational(1, 2)", set()),
    ("Float('0.5', precision=53)", set()),
    ("2*s39", {"s39"}),
    ("s0 - 1", {"s0"}),
    ("(s0//2)", {"s0"}),
    ("(s0 > 2) & (s0 < 9)", {"s0"}),
    ("-int_oo", set()),
    ("true", set()),
    ("Eq(PythonMod(s0, 2), 0)", {"s0"}),
])
def test_expressions_torch_export_writes_are_accepted(text, used):
    assert symbols(parse_shape_expression(text)) == used


@pytest.mark.parametrize("text", [
    "L['x'].size()[0] == L['y'].size()[0]",
    "((3*L['x'].size()[0]) % 6) == 0",
    "3*(L['x'].size()[0] // 2)*(L['x'].size()[0] // (L['x'].size()[0] // 2)) >= 2",
    "2 <= L['x'].size()[0] <= 64",
    "L['x'].size()[0] > 4",
    "L['inputs'][0]['ids'].stride()[1] == 1 and L['x'].storage_offset() == 0",
    "not (L['x'].size()[1] != 3)",
    "Max(1, L['x'].size()[0]) == 3",
])
def test_guards_torch_export_writes_are_accepted(text):
    parse_guard(text)


@pytest.mark.parametrize(("text", "why"), [
    ("open(chr(47)+chr(116)+chr(109)+chr(112), chr(119)) and s77", "'open' is not a shape function"),
    ("__import__('os').system('id')", "'__import__' is not a shape function"),
    ("s0.__class__", "expected the end"),
    ("Integer(1).__class__.__base__", "expected the end"),
    ("getattr(s0, 'x')", "'getattr' is not a shape function"),
    ("Symbol('s0', positive=True, integer=__import__('os'))", "expected True or False"),
    ("Symbol('os.system')", "a symbol is a short lowercase prefix"),
    ("Symbol('s0', evaluate=True)", "expected a symbol assumption"),
    ("Integer(s0)", "expected an integer"),
    ("Mul(Integer(64), x)", "unknown name"),
    ("Max(s0=1)", "expected ')'"),
    ("Mul(*s0)", "expected a number"),
    ("lambda: 1", "unexpected character ':'"),
    ("s0; 1", "unexpected character ';'"),
    ("s0 if s0 else 1", "expected the end"),
    ("[s0 for s0 in ()]", "expected a number"),
    ("'s0'", "expected a number"),
    ("Function('f')(s0)", "'Function' is not a shape function"),
    ("sympify('s0')", "'sympify' is not a shape function"),
    ("0x10", "expected the end"),
    ("1_000", "expected the end"),
    ("s0 and s1", "expected the end"),  # Python's keywords belong to guards only
    ("(" * 100 + "s0" + ")" * 100, "nested deeper"),
    ("s0**" * 1000 + "s0", "nested deeper"),
    ("s0 + " * 10_000 + "s0", "longer than"),
])
def test_anything_outside_the_grammar_is_refused(text, why):
    with pytest.raises(ExpressionError, match=re.escape(why)):
        parse_shape_expression(text)


@pytest.mark.parametrize(("text", "why"), [
    ("L['x'].size()[1] == 3 and open('/tmp/pwned', 'w') is not None", "'open' is not a shape function"),
    ("L['x'].size()[0] == 3 or __import__('os').system('id')", "'__import__' is not a shape function"),
    ("L['x'].__class__", "only .size(), .stride() and .storage_offset()"),
    ("L['x'].numpy()", "only .size(), .stride() and .storage_offset()"),
    ("L['x'].size()[0] == s0", "unknown name"),
    ("L[x].size()[0] == 1", "expected an input name or index"),
    ("3 == 3", "must check an input"),
    ("not " * 100 + "L['x'].size()[0]", "nested deeper"),
])
def test_guards_outside_the_grammar_are_refused(text, why):
    with pytest.raises(ExpressionError, match=re.escape(why)):
        parse_guard(text)
