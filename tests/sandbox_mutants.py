"""Simple mutants of a HumanEval solution, for checking that the code-task machinery fails
wrong programs: a swapped comparison (``<`` and ``>``, ``<=`` and ``>=``, ``==`` and ``!=``),
an off-by-one (a numeric constant ``n`` becomes ``n + 1``) and a swapped operator (``+`` and
``-``, ``*`` becomes ``+``). Only the solution's own lines
are mutated, never the prompt's signature, docstring or helper functions."""

from __future__ import annotations

import ast

ARITH = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Add}
SWAP = {ast.Lt: ast.Gt, ast.Gt: ast.Lt, ast.LtE: ast.GtE, ast.GtE: ast.LtE, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq}


def _sites(tree: ast.Module, first_line: int) -> tuple[list, list, list]:
    compares, constants, arith = [], [], []
    for node in ast.walk(tree):
        if getattr(node, "lineno", 0) < first_line:
            continue
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in SWAP:
            compares.append(node)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, (int, float))
            and not isinstance(node.value, bool)
        ):
            constants.append(node)
        elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in ARITH:
            arith.append(node)
    key = lambda n: (n.lineno, n.col_offset)  # noqa: E731
    return sorted(compares, key=key), sorted(constants, key=key), sorted(arith, key=key)


def mutants(prompt: str, solution: str) -> list[tuple[str, str]]:
    """``(description, program)`` for the first swapped-comparison site, the first numeric
    constant (off by one) and the first ``+``/``-``/``*`` (swapped) of ``solution``, each kind
    that the solution has."""
    source = prompt + solution
    first_line = prompt.count("\n") + 1
    out = []
    for kind in ("swap", "off-by-one", "arith"):
        tree = ast.parse(source)
        compares, constants, arith = _sites(tree, first_line)
        if kind == "swap" and compares:
            node = compares[0]
            old = type(node.ops[0])
            node.ops[0] = SWAP[old]()
            out.append((f"line {node.lineno}: {old.__name__} -> {SWAP[old].__name__}", ast.unparse(tree)))
        elif kind == "off-by-one" and constants:
            node = constants[0]
            what = f"line {node.lineno}: {node.value} -> {node.value + 1}"
            node.value += 1
            out.append((what, ast.unparse(tree)))
        elif kind == "arith" and arith:
            node = arith[0]
            old = type(node.op)
            node.op = ARITH[old]()
            out.append((f"line {node.lineno}: {old.__name__} -> {ARITH[old].__name__}", ast.unparse(tree)))
    return out
