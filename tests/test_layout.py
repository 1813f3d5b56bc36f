"""The server file keeps the section order its docstring promises."""
import ast
import os
import re

from conftest import ROOT

BANNER = re.compile(r'^# -{90,}\n# (.+)\n# -{90,}$', re.M)


def server_source():
    with open(os.path.join(ROOT, 'p3s_server.py')) as f:
        return f.read()


def promised_order(source):
    """The section names listed in the docstring: '… in these sections (…): a, b, …, z.'"""
    doc = ast.get_docstring(ast.parse(source))
    listed = doc.split('in these sections', 1)[1].split(':', 1)[1].split('.', 1)[0]
    return [name.strip().lower() for name in listed.replace('\n', ' ').split(',')]


def test_banners_follow_the_order_in_the_docstring():
    source = server_source()
    found = [title.split(':')[0].strip().lower() for title in BANNER.findall(source)]
    assert found == promised_order(source)


def test_every_banner_has_both_rules():
    """A banner is a title between two rules; a title with one rule is a merge left over."""
    lines = server_source().split('\n')
    for i, line in enumerate(lines):
        if re.match(r'^# -{90,}$', line) and not re.match(r'^# -{90,}$', lines[i - 2]):
            assert re.match(r'^# -{90,}$', lines[i + 2]), 'a banner without its second rule at ' \
                'line %d' % (i + 1)


def test_sql_sits_in_the_section_that_runs_it():
    """Each SQL constant is defined in the same section as its first use, or in the database
    section (shared columns and statements)."""
    source = server_source()
    lines = source.split('\n')
    starts = [(source.count('\n', 0, m.start()) + 1, m.group(1).split(':')[0].strip().lower())
              for m in BANNER.finditer(source)]

    def section(line):
        return [name for start, name in starts if start <= line][-1]

    tree = ast.parse(source)
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)):
            continue
        texts = [n.value for n in ast.walk(node.value)
                 if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        if not any(re.search(r'\b(SELECT|UPDATE|INSERT|DELETE)\b', t) for t in texts):
            continue
        name = node.targets[0].id
        uses = [i + 1 for i, text in enumerate(lines[node.end_lineno:], node.end_lineno)
                if re.search(r'(?<![A-Za-z0-9_])%s(?![A-Za-z0-9_])' % name, text)]
        if not uses:
            continue
        home, used = section(node.lineno), section(uses[0])
        assert home in (used, 'database'), '%s is defined in %s but first used in %s' % (
            name, home, used)
