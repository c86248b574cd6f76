"""
Settings for train.py and sample.py, nanoGPT style: a script defines its settings as
module globals, then calls configure(globals()), which applies, in order,

    python train.py config/portrait.py --lr=1e-4 --seed=3 --attention

a config file (plain Python assigning some of those globals) and --key=value
overrides (parsed as Python literals, else taken as a string; --key alone sets a
boolean to True). Unknown keys and values of the wrong type are errors, so a typo
never silently trains with a default.
"""

import ast
import difflib
import sys
import types

def check(key, value, defaults, source):
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise SystemExit(f"{source}: unknown setting '{key}'{hint}")
    want = defaults[key]
    if want is None or value is None:  # None means "not set": any type may replace it, and it may be unset
        return value
    if isinstance(want, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(want, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(want)(value)
    if type(value) is not type(want):
        raise SystemExit(f"{source}: '{key}' must be {type(want).__name__} (default {want!r}), got {value!r}")
    return value

def configure(scope, argv=None):
    """Apply a config file and --key=value overrides to the settings in `scope`; returns the resolved settings."""
    argv = sys.argv[1:] if argv is None else argv
    defaults = {k: v for k, v in scope.items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, list, type(None)))}
    if "-h" in argv or "--help" in argv:
        print((scope.get("__doc__") or "").strip() + "\n\nsettings (a config file or --key=value changes them):")
        for k, v in defaults.items():
            print(f"  {k} = {v!r}")
        raise SystemExit(0)
    for arg in argv:
        if not arg.startswith("--"):
            try:
                with open(arg) as f:
                    code = f.read()
            except OSError as e:
                raise SystemExit(f"cannot read config file {arg}: {e.strerror}")
            values = {}
            exec(compile(code, arg, "exec"), {}, values)
            for k, v in values.items():
                if not (k.startswith("_") or callable(v) or isinstance(v, types.ModuleType)):  # skip imports, helpers
                    scope[k] = check(k, v, defaults, arg)
            print(f"config file {arg}")
        else:
            key, eq, text = arg[2:].partition("=")
            if not eq:  # --flag
                if not isinstance(defaults.get(key), bool):
                    check(key, True, defaults, arg)  # names unknown keys and non-boolean ones
                value = True
            else:
                try:
                    value = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    value = text  # a plain string such as --init_from=runwayml/x
                if isinstance(defaults.get(key), str) and not isinstance(value, str) and value is not None:
                    value = text  # --prompt=1 stays the string "1"
            scope[key] = check(key, value, defaults, arg)
    return {k: scope[k] for k in defaults}
