"""The size budgets (``tests/sanity/budgets.py``) and the architecture page, checked so they cannot
drift: product files and functions within their line budgets (or a ``Size:`` reason in their
docstring), no backslash line continuations, the quickstart pipeline within its leaves, and
``docs/architecture.md``'s table of modules by layer equal to what the import graph says. Line width
is ruff's E501 at 120 columns (``test_layout.test_lint_clean``)."""

from pathlib import Path

from tests.sanity import budgets, import_graph

ROOT = Path(__file__).resolve().parents[2]


def test_product_files_and_functions_fit_their_budgets():
    files, functions = budgets.oversized(ROOT)
    assert files == [], f"over {budgets.MAX_FILE_LINES} lines, with no 'Size:' reason in the module docstring"
    assert functions == [], f"over {budgets.MAX_FUNCTION_LINES} lines, with no 'Size:' reason in the docstring"


def test_no_backslash_line_continuations():
    assert budgets.backslashes(ROOT) == [], "use parentheses (PEP 8)"


def test_the_quickstart_says_only_what_a_user_needs_to_see():
    assert budgets.quickstart_leaves(ROOT) <= budgets.MAX_QUICKSTART_LEAVES


def test_the_budget_checks_can_fail(tmp_path):
    """A planted oversized module, a long function and a backslash are found; a ``Size:`` reason and a
    backslash inside a string or a comment are not counted."""
    package = tmp_path / "pipelines"
    package.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(budgets.MAX_FUNCTION_LINES + 1))
    (package / "big.py").write_text("def long():\n" + body + "\n" + "\n" * budgets.MAX_FILE_LINES)
    (package / "excused.py").write_text('"""Excused.\n\nSize: a reason."""\n' + "\n" * budgets.MAX_FILE_LINES)
    files, functions = budgets.oversized(tmp_path)
    assert files == [f"pipelines/big.py ({budgets.MAX_FUNCTION_LINES + 2 + budgets.MAX_FILE_LINES})"]
    assert functions == [f"pipelines/big.py:long ({budgets.MAX_FUNCTION_LINES + 2})"]  # its def line too
    assert budgets.continuations("a = 1 + \\\n    2\nb = 'x\\\\'  # c \\\n") == [1]
    assert budgets.continuations("c = (1 +\n     2)\nd = '''\\\n'''\n") == []


def test_the_architecture_page_lists_every_module_in_its_layer():
    """docs/architecture.md holds the generated table of modules by layer; a module added, moved or
    renamed without it fails here (regenerate: python -m tests.sanity.import_graph --markdown)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert import_graph.DOC_BEGIN in text and import_graph.DOC_END in text
    shipped = text.split(import_graph.DOC_BEGIN, 1)[1].split(import_graph.DOC_END, 1)[0].strip()
    assert shipped == import_graph.layer_table(ROOT)
