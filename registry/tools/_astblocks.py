"""The AST rewriting the bundler (:mod:`.bundle`) and the specialiser (:mod:`.specialize`) share."""

from __future__ import annotations

import ast

_BODIES = ("body", "orelse", "finalbody")
"""The fields of a node that hold a block of statements."""


class BlockTransformer(ast.NodeTransformer):
    """A transformer that rewrites every block of statements as a whole with :meth:`block` (which
    may drop, splice or cut statements) and every other child node with ``visit``. A ``body`` left
    empty becomes ``pass``; an empty ``orelse`` or ``finalbody`` is no branch."""

    def block(self, stmts: list[ast.stmt]) -> list[ast.stmt]:
        raise NotImplementedError

    def generic_visit(self, node: ast.AST) -> ast.AST:
        for name, value in ast.iter_fields(node):
            if isinstance(value, list) and name in _BODIES:
                setattr(node, name, self.block(value) or ([ast.Pass()] if name == "body" else []))
            elif isinstance(value, list):
                setattr(node, name, [self.visit(v) if isinstance(v, ast.AST) else v for v in value])
            elif isinstance(value, ast.AST):
                setattr(node, name, self.visit(value))
        return node

    def visit_Module(self, node: ast.Module) -> ast.Module:
        node.body = self.block(node.body)
        return node
