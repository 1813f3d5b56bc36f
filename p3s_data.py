#!/usr/bin/env python3
"""p3s data client: datatypes (the types of the files on workflow edges).

usage:
  python p3s_data.py -R -j '{"name":"TXT","ext":".txt","comment":"text"}'   register a datatype
  python p3s_data.py -R -j txtDataType.json                                (or from a file)
  python p3s_data.py -D NAME                                               delete a datatype
  python p3s_data.py --list                                                list the datatypes
Add --json for machine-readable output. The server is --server or P3S_SERVER
(default http://127.0.0.1:8080/); P3S_TOKEN is sent as a bearer token when set.

A datatype has a name and an extension with its dot (`.txt`): workflow files are named
<uuid><ext> by default. Registering an existing name updates its extension and comment.
Every datatype named on a DAG's edges must exist before a workflow is made from the DAG.

Exit codes (shared by every p3s client):
  0  success                        2  bad command line
  1  the server refused a request   3  the server could not be reached or answered nonsense
                                    4  a local file is missing or invalid
This file uses the Python standard library only: copy it alone onto any node.
"""
import argparse
import http.client
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INPUT = 0, 1, 2, 3, 4
DEFAULT_SERVER = 'http://127.0.0.1:8080/'
HTTP_TIMEOUT = 60.0
DATATYPE_COLUMNS = ('name', 'ext', 'comment', 'created_at')


class P3SError(Exception):
    """A failure with a one-line message; `code` is the exit code it leads to."""

    def __init__(self, message, code=EXIT_REFUSED):
        super().__init__(message)
        self.code = code


def call(server, method, path, body=None, timeout=HTTP_TIMEOUT):
    """One JSON request to the server. The only code that touches urllib."""
    url = server.rstrip('/') + path
    headers = {'Content-Type': 'application/json', 'Accept': 'application/json'}
    if os.environ.get('P3S_TOKEN'):
        headers['Authorization'] = 'Bearer ' + os.environ['P3S_TOKEN']
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as reply:
            return json.loads(reply.read().decode() or '{}')
    except urllib.error.HTTPError as e:
        code = EXIT_UNREACHABLE if e.code >= 500 else EXIT_REFUSED
        raise P3SError('server: %s (HTTP %d)' % (error_text(e), e.code), code) from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        reason = getattr(e, 'reason', None) or e
        raise P3SError('cannot reach the server at %s: %s' % (server, reason),
                       EXIT_UNREACHABLE) from None


def error_text(http_error):
    try:
        return json.loads(http_error.read().decode())['error']
    except Exception:
        return http_error.reason


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def json_option(value):
    """-j as the original took it: a value containing `.json` is a file, else JSON text."""
    where = value
    if '.json' in value:
        try:
            with open(value) as f:
                value = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise P3SError('cannot read %s: %s' % (where, getattr(e, 'strerror', None) or e),
                           EXIT_INPUT) from None
    else:
        where = '-j'
    try:
        return json.loads(value)
    except ValueError as e:
        raise P3SError('%s is not valid JSON: %s' % (where, e), EXIT_INPUT) from None


def register_datatype(args):
    datatype = call(args.server, 'POST', '/api/datatypes', json_option(args.json_text))
    if args.json:
        print(json.dumps(datatype, indent=1))
    else:
        print('datatype %s (%s) registered' % (datatype['name'], datatype['ext']))
    return EXIT_OK


def delete_datatype(args):
    reply = call(args.server, 'DELETE', '/api/datatypes/%s' % urllib.parse.quote(args.delete,
                                                                                 safe=''))
    print(json.dumps(reply) if args.json else 'datatype %s deleted' % args.delete)
    return EXIT_OK


def list_datatypes(args):
    datatypes = call(args.server, 'GET', '/api/datatypes')['datatypes']
    if args.json:
        print(json.dumps({'datatypes': datatypes}, indent=1))
        return EXIT_OK
    cells = [[str(d.get(c) or '') for c in DATATYPE_COLUMNS] for d in datatypes]
    widths = [max([len(c)] + [len(row[i]) for row in cells])
              for i, c in enumerate(DATATYPE_COLUMNS)]
    for row in [list(DATATYPE_COLUMNS)] + cells:
        print('  '.join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return EXIT_OK


def parse_args(argv):
    ap = argparse.ArgumentParser(prog='p3s_data.py', description='Manage p3s datatypes.',
                                 epilog='Exit codes: 0 ok, 1 refused by the server, 2 bad '
                                 'command line, 3 server unreachable, 4 bad local file.')
    do = ap.add_mutually_exclusive_group(required=True)
    do.add_argument('-R', '--register-type', action='store_true',
                    help='register (or update) the datatype of -j')
    do.add_argument('-D', '--delete-type', dest='delete', metavar='NAME', help='delete a datatype')
    do.add_argument('--list', action='store_true', help='list the datatypes')
    ap.add_argument('-j', dest='json_text', metavar='JSON',
                    help='the datatype: JSON text or a .json file')
    ap.add_argument('--json', action='store_true', help='machine-readable output')
    ap.add_argument('-S', '--server', default=os.environ.get('P3S_SERVER') or DEFAULT_SERVER,
                    help='server URL (P3S_SERVER; default %s)' % DEFAULT_SERVER)
    args = ap.parse_args(argv)
    if args.register_type and not args.json_text:
        ap.error('-R needs -j JSON')
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.register_type:
            return register_datatype(args)
        if args.delete:
            return delete_datatype(args)
        return list_datatypes(args)
    except P3SError as e:
        print('p3s_data: error: %s' % e, file=sys.stderr)
        return e.code


if __name__ == '__main__':
    sys.exit(main())
