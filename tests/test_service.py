"""The systemd units in systemd/: systemd's own checks pass on them (where systemd's tools are
installed), they carry the hardening the docs promise, and the server's command line in them
starts the server."""
import configparser
import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.request

import pytest

from conftest import ROOT, api

UNITS = sorted(glob.glob(os.path.join(ROOT, 'systemd', '*.service')))
INSTALLED_BIN = '/opt/p3s/bin/'          # where the units expect p3s (docs/operations.md)
HARDENING = {'NoNewPrivileges': 'yes', 'ProtectSystem': 'strict', 'ProtectHome': 'yes',
             'PrivateTmp': 'yes', 'CapabilityBoundingSet': ''}
ANALYZE = shutil.which('systemd-analyze')
needs_systemd = pytest.mark.skipif(not ANALYZE, reason='systemd-analyze is not installed '
                                   '(Debian package systemd; .ci/run installs it)')


def unit(path):
    """A unit file as {section: {key: [values]}} (keys may repeat)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=('=',),
                                       dict_type=MultiDict, empty_lines_in_values=False)
    parser.optionxform = str
    parser.read(path)
    return {s: {k: v.split('\n') for k, v in parser[s].items()} for s in parser.sections()}


class MultiDict(dict):
    """Repeated keys of a unit keep every value (configparser joins them with newlines)."""

    def __setitem__(self, key, value):
        if isinstance(value, list) and key in self:
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


def with_binaries(path, tmp_path):
    """The unit with the installed programs replaced by stand-ins that exist here: `verify`
    insists that ExecStart names an executable."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir(exist_ok=True)
    text = open(path).read()
    for name in set(re.findall(re.escape(INSTALLED_BIN) + r'([\w.-]+)', text)):
        stand_in = bin_dir / name
        stand_in.write_text('#!/bin/sh\nexit 0\n')
        stand_in.chmod(0o755)
    copy = tmp_path / os.path.basename(path)
    copy.write_text(text.replace(INSTALLED_BIN, str(bin_dir) + '/'))
    return copy


def test_there_is_a_unit_for_the_server():
    assert os.path.join(ROOT, 'systemd', 'p3s-server.service') in UNITS


@needs_systemd
@pytest.mark.parametrize('path', UNITS, ids=os.path.basename)
def test_systemd_verifies_the_unit(path, tmp_path):
    proc = subprocess.run([ANALYZE, 'verify', str(with_binaries(path, tmp_path))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


@needs_systemd
@pytest.mark.parametrize('path', UNITS, ids=os.path.basename)
def test_systemd_rates_the_unit_well_confined(path, tmp_path):
    """An overall exposure of 2.0 or less on systemd's scale of 0 (confined) to 10."""
    proc = subprocess.run([ANALYZE, 'security', '--offline=yes', '--threshold=20',
                           str(with_binaries(path, tmp_path))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr


@pytest.mark.parametrize('path', UNITS, ids=os.path.basename)
def test_the_unit_is_hardened(path):
    """The options the docs promise, and a user of its own: made by systemd, or named."""
    service = unit(path)['Service']
    for key, value in HARDENING.items():
        assert service.get(key) == [value], key
    assert service.get('DynamicUser') == ['yes'] or service.get('User', [''])[0] not in ('', 'root')


def test_the_units_command_line_starts_the_server(tmp_path):
    """ExecStart and Environment as systemd would use them, with %S and %t (the state and
    runtime roots) and the settings file's P3S_SERVER_ARGS filled in: the database lands in the
    state directory, the counts behind /metrics in the runtime directory."""
    service = unit(os.path.join(ROOT, 'systemd', 'p3s-server.service'))['Service']
    assert service['StateDirectory'] == ['p3s'] and service['DynamicUser'] == ['yes']
    roots = {'%S': str(tmp_path / 'lib'), '%t': str(tmp_path / 'run')}
    for name in service['StateDirectory'] + service['RuntimeDirectory']:
        for root in roots.values():
            os.makedirs(os.path.join(root, name), exist_ok=True)     # systemd makes them

    def filled(text):
        for specifier, path in roots.items():
            text = text.replace(specifier, path)
        return text

    env = dict(os.environ)
    for setting in service['Environment']:
        key, value = filled(setting).split('=', 1)
        env[key] = value
    words = shlex.split(filled(service['ExecStart'][0]))
    assert words[0] == INSTALLED_BIN + 'p3s-server' and words[-1] == '$P3S_SERVER_ARGS'
    command = [sys.executable, os.path.join(ROOT, 'p3s_server.py')] + words[1:-1] + ['--port', '0']
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert 'listening on' in line, line
        url = line.split('listening on ')[1].split()[0]
        assert api(url, 'GET', '/api/ping')[0] == 200
        with urllib.request.urlopen(url + 'metrics', timeout=30) as reply:
            assert b'p3s_claims_total 0.0' in reply.read()
        assert (tmp_path / 'lib' / 'p3s' / 'p3s.db').exists()
        assert os.listdir(tmp_path / 'run' / 'p3s'), 'no counts in the runtime directory'
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        proc.stdout.close()
