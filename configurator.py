"""
Poor Man's Configurator, as in nanoGPT. Run as `exec(open('configurator.py').read())` from a script whose
config lives in plain globals:
    python train.py config/rlvr.py --max_steps=100 --lr=1e-4
A bare argument is a Python config file that is exec'd; --key=value overrides one global, with the type
checked against the default. Unknown keys are errors, so a typo never silently trains the wrong thing.
"""
import sys
from ast import literal_eval

for arg in sys.argv[1:]:
    if '=' not in arg:
        assert not arg.startswith('--'), f"expected --key=value or a config file, got {arg!r}"
        print(f"Overriding config with {arg}:")
        with open(arg) as f:
            print(f.read())
        exec(open(arg).read())
    else:
        assert arg.startswith('--'), f"expected --key=value, got {arg!r}"
        key, val = arg[2:].split('=', 1)
        if key not in globals():
            raise ValueError(f"Unknown config key: {key}")
        default = globals()[key]
        try:
            attempt = val if isinstance(default, str) else literal_eval(val)  # numbers, bools...
        except (SyntaxError, ValueError):
            attempt = val                                                     # ...else a string, to be type-checked
        if default is not None and type(attempt) != type(default):
            if isinstance(default, float) and isinstance(attempt, int):
                attempt = float(attempt)
            else:
                raise ValueError(f"--{key}={val!r}: expected {type(default).__name__}, got {type(attempt).__name__}")
        print(f"Overriding: {key} = {attempt}")
        globals()[key] = attempt
