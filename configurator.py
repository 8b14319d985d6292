"""
Poor Man's Configurator, as in nanoGPT. Run as `exec(open('configurator.py').read())` from a script
whose config lives in plain globals:
    python train.py config/rlvr.py --max_steps=100 --lr=1e-4
A bare argument is a Python config file that is exec'd; --key=value overrides one global, with the
type checked against the default. Unknown keys are errors, so a typo never silently trains the wrong
thing. The names set are kept in _overrides.
It also makes a user's mistake (settings.UserError: a bad value, a missing or corrupt file) end the
script with one line on stderr, "error: <message>", printed by the first rank only under torchrun.
Any other exception is a bug, in nanobridge or in a fork, and keeps its traceback;
NANOBRIDGE_TRACEBACK=1 shows one for a UserError too.
"""
import os
import sys
from ast import literal_eval
from difflib import get_close_matches

from settings import UserError


def _user_errors(kind, e, tb):
    if issubclass(kind, UserError) and not os.environ.get('NANOBRIDGE_TRACEBACK'):
        if int(os.environ.get('RANK', 0)) == 0:  # every rank meets the same bad input: say it once
            msg = '; '.join(l.strip() for l in str(e).splitlines() if l.strip())
            print(f"error: {msg[:600]}{' ...' if len(msg) > 600 else ''}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, e, tb)


sys.excepthook = _user_errors
# the names this command set (train.py --init_from=resume reads every other one from the run)
_overrides = set()
for arg in sys.argv[1:]:
    if '=' not in arg:
        if arg.startswith('--'):
            raise UserError(f"expected --key=value or a config file, got {arg!r}")
        if not os.path.isfile(arg):
            raise UserError(f"config file {arg!r} does not exist")
        print(f"Overriding config with {arg}:")
        with open(arg) as f:
            print(f.read())
        _set = {}  # what the file assigns lands here first, so that we know its names
        exec(open(arg).read(), globals(), _set)
        unknown = sorted(k for k, v in _set.items()
                         if k not in globals() and type(v) is not type(sys))  # (modules)
        if unknown:  # a typo in a config file would otherwise set a global nothing reads, silently
            raise UserError(f"{arg}: unknown config key(s) {', '.join(unknown)}")
        globals().update(_set)
        _overrides |= set(_set)
    else:
        if not arg.startswith('--'):
            raise UserError(f"expected --key=value, got {arg!r}")
        key, val = arg[2:].split('=', 1)
        if key not in globals():
            near = get_close_matches(key, [k for k in globals() if not k.startswith('_')], n=1)
            raise UserError(f"Unknown config key: {key}"
                            + (f" (did you mean {near[0]}?)" if near else ''))
        default = globals()[key]
        try:
            attempt = val if isinstance(default, str) else literal_eval(val)  # numbers, bools...
        except (SyntaxError, ValueError):
            attempt = val                                                     # ...else a string,
                                                                              # to be type-checked
        if default is not None and type(attempt) != type(default):
            if isinstance(default, float) and isinstance(attempt, int):
                attempt = float(attempt)
            else:
                raise UserError(f"--{key}={val!r}: expected {type(default).__name__}, "
                                f"got {type(attempt).__name__}")
        print(f"Overriding: {key} = {attempt}")
        globals()[key] = attempt
        _overrides.add(key)
