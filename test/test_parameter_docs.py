"""docs/parameters.md against the nodes' real declarations.

The generator (`ami-ros parameters --markdown`) constructs every node in a
process of its own; these tests compare its output with the committed page,
and check what the page promises: every parameter is described, and every
range declared in the source is shown.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ami_ros.cli import available_nodes

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / 'docs' / 'parameters.md'
REGENERATE = '.venv/bin/ami-ros parameters --markdown > docs/parameters.md'
_RANGE = re.compile(r'\[(-?[0-9.e+]+), (-?[0-9.e+]+)\]')


LAUNCH_SECTION = 'Launch arguments'


@pytest.fixture(scope='module')
def generated() -> str:
    result = subprocess.run([sys.executable, '-m', 'ami_ros.cli', 'parameters', '--markdown'],
                            cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope='module')
def rows(generated: str) -> dict[str, dict[str, list[str]]]:
    """node -> parameter -> [type, default, range/choices, description], parsed from the tables."""
    tables: dict[str, dict[str, list[str]]] = {}
    node = None
    for line in generated.splitlines():
        if line.startswith('## '):
            node = line[3:].strip()
            if node == LAUNCH_SECTION:  # the launchers' arguments: not a node's table
                node = None
                continue
            tables[node] = {}
        elif line.startswith('| `') and node is not None:
            cells = [c.strip().replace('\\|', '|') for c in re.split(r'(?<!\\)\|', line)[1:-1]]
            assert len(cells) == 5, line
            tables[node][cells[0].strip('`')] = cells[1:]
    return tables


def test_the_page_is_current(generated: str) -> None:
    assert PAGE.exists(), f'docs/parameters.md is missing; generate it: {REGENERATE}'
    if PAGE.read_text() != generated:  # one line, not a diff of the whole page
        pytest.fail(f'docs/parameters.md is stale; regenerate it: {REGENERATE}', pytrace=False)


def test_the_launch_arguments_have_a_table_from_their_declaration(generated: str) -> None:
    from ami_ros.graph import LAUNCH_ARGUMENTS

    section = generated.split(f'## {LAUNCH_SECTION}\n', 1)[1].split('\n## ', 1)[0]
    listed = {line.split('`')[1]: line for line in section.splitlines() if line.startswith('| `')}
    assert list(listed) == list(LAUNCH_ARGUMENTS)
    for name, arg in LAUNCH_ARGUMENTS.items():
        assert f'`{arg.default}`' in listed[name] and arg.description.split(';')[0] in listed[name], name


def test_every_node_has_a_table(rows: dict) -> None:
    assert list(rows) == available_nodes()
    for node, params in rows.items():
        assert params, f'{node}: no parameters found'


def test_every_parameter_has_a_description(rows: dict) -> None:
    missing = [f'{node}.{name}' for node, params in rows.items()
               for name, (_, _, _, description) in params.items() if not description]
    assert not missing, f'parameters without a description: {", ".join(missing)}'


def test_every_numeric_parameter_has_a_range(rows: dict) -> None:
    missing = [f'{node}.{name}' for node, params in rows.items()
               for name, (kind, _, constraints, _) in params.items()
               if kind.split(',')[0] in ('integer', 'double') and not _RANGE.search(constraints)]
    assert not missing, f'numeric parameters without a range (declare low=/high=): {", ".join(missing)}'


def _constant(expr: ast.expr) -> object:
    """The value of a literal or of constant arithmetic (2**31 - 1); None for anything else."""
    allowed = (ast.Constant, ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop, ast.Tuple, ast.Load)
    if not all(isinstance(n, allowed) for n in ast.walk(expr)):
        return None
    return eval(compile(ast.Expression(expr), '<declare>', 'eval'))  # only constants reach here


def _declared_in_source() -> list[tuple[str, dict[str, object]]]:
    """(name, {low, high, choices}) of every declare() call in the package with constant arguments."""
    found = []
    for path in sorted((ROOT / 'ami_ros').rglob('*.py')):
        for call in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                    and call.func.attr == 'declare' and call.args
                    and isinstance(call.args[0], ast.Constant)):
                continue
            keywords = {k.arg: _constant(k.value) for k in call.keywords
                        if k.arg in ('low', 'high', 'choices')}
            found.append((call.args[0].value, {k: v for k, v in keywords.items() if v is not None}))
    return found


def test_declared_ranges_and_choices_are_shown(rows: dict) -> None:
    declared = _declared_in_source()
    assert sum('low' in k for _, k in declared) >= 20  # the scan itself works
    for name, keywords in declared:
        shown = [params[name][2] for params in rows.values() if name in params]
        assert shown, f'{name} is declared in the source but in no table'
        if 'low' in keywords and 'high' in keywords:
            bounds = [tuple(map(float, m.groups())) for c in shown if (m := _RANGE.search(c))]
            assert (float(keywords['low']), float(keywords['high'])) in bounds, (name, keywords, shown)
        if 'choices' in keywords:
            assert any(', '.join(keywords['choices']) in c for c in shown), (name, keywords, shown)


def test_the_parameters_file_sets_only_declared_parameters(rows: dict) -> None:
    # ROS ignores a parameter no node declares: a typo in config/ami.yaml would go unnoticed.
    params = yaml.safe_load((ROOT / 'config' / 'ami.yaml').read_text())
    for key, section in params.items():
        node = key.removeprefix('/**/')
        assert node in rows, f'config/ami.yaml names {key}, which is no node of the package'
        unknown = set(section['ros__parameters']) - set(rows[node])
        assert not unknown, f'config/ami.yaml sets {sorted(unknown)} that {node} does not declare'
