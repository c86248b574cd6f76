"""
Settings for train.py, sample.py, postprocess.py, eval.py, study.py and bench.py, nanoGPT style: a script defines its settings
as module globals, then calls configure(globals()), which applies, in order,

    python train.py config/portrait.py --lr=1e-4 --seed=3 --attention

a config file (plain Python assigning some of those globals) and --key=value
overrides (parsed as Python literals, else taken as a string, whose leading ~/ is the
home folder: the shell leaves it after '='; --key alone sets a boolean to True).
Unknown keys and values of the wrong type are errors, so a typo never silently
trains with a default; None is a value only of settings whose default
is None, or that the script names in `nullable`. Names in upper case (CROP) are constants, not
settings. --help lists every setting with the value it has at that point of the
command line, so `python train.py config/portrait.py --help` shows what the config sets.

Settings with a fixed set of values are checked by the script with check_choice and
check_device before any model loads.
"""

import ast
import difflib
import os
import sys
import types

def check(key, value, defaults, source, nullable=()):
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise SystemExit(f"{source}: unknown setting '{key}'{hint}")
    want = defaults[key]
    if want is None or (value is None and key in nullable):  # None: "not set"; any type may replace it
        return value
    if isinstance(want, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(want, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(want)(value)
    if type(value) is not type(want):
        raise SystemExit(f"{source}: '{key}' must be {type(want).__name__} (default {want!r}), got {value!r}")
    return value

def print_help(scope, defaults):
    """The script's docstring, then each setting's current value and, where it differs, its default."""
    print((scope.get("__doc__") or "").strip() + "\n\nsettings (a config file or --key=value changes them):")
    for k, default in defaults.items():
        changed = f"    (default {default!r})" if scope[k] != default else ""
        print(f"  {k} = {scope[k]!r}{changed}")

def configure(scope, argv=None, nullable=()):
    """Apply a config file and --key=value overrides to the settings in `scope`; returns the resolved settings.
    nullable: settings with a default other than None that may also be set to None."""
    argv = sys.argv[1:] if argv is None else argv
    defaults = {k: v for k, v in scope.items() if not k.startswith("_") and not k.isupper()
                and isinstance(v, (int, float, bool, str, tuple, list, type(None)))}
    for arg in argv:
        if arg in ("-h", "--help"):
            print_help(scope, defaults)
            raise SystemExit(0)
        if not arg.startswith("--"):
            try:
                with open(arg) as f:
                    code = f.read()
            except OSError as e:
                raise SystemExit(f"cannot read config file {arg}: {e.strerror}")
            values = {}  # one namespace, so a function or comprehension in the file sees its other names
            exec(compile(code, arg, "exec"), values)
            for k, v in values.items():
                if not (k.startswith("_") or callable(v) or isinstance(v, types.ModuleType)):  # skip imports, helpers
                    scope[k] = check(k, v, defaults, arg, nullable)
            print(f"config file {arg}")
        else:
            key, eq, text = arg[2:].partition("=")
            if not eq:  # --flag
                if key in defaults and not isinstance(defaults[key], bool):
                    raise SystemExit(f"{arg}: '{key}' takes a value: write --{key}=VALUE, with '='")
                value = True
            else:
                try:
                    value = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    # a plain string such as --init_from=runwayml/x; the shell leaves ~ in --key=~/x to us
                    value = os.path.expanduser(text) if text.startswith("~/") else text
                if isinstance(defaults.get(key), str) and not isinstance(value, str) and value is not None:
                    value = text  # --prompt=1 stays the string "1"
            scope[key] = check(key, value, defaults, arg, nullable)
    return {k: scope[k] for k in defaults}

def check_choice(key, value, choices):
    """`value` if it is one of `choices` (any iterable, e.g. the keys of a dict), else SystemExit naming them."""
    if value not in choices:
        raise SystemExit(f"{key} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value

def check_device(device):
    """`device` if this machine has it (cpu, cuda, cuda:N, mps), else SystemExit saying to use --device=cpu."""
    import torch  # here, not at the top: postprocess.py's command line has no device and needs no torch
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda", "mps"):
        raise SystemExit(f"device={device!r} is not a device: use --device=cpu, --device=cuda, "
                         "--device=cuda:N or --device=mps")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"device={device!r} but PyTorch sees no CUDA GPU (torch.cuda.is_available() is "
                             "False): use --device=cpu")
        index, count = torch.device(device).index, torch.cuda.device_count()
        if index is not None and index >= count:
            raise SystemExit(f"device={device!r} but this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}: use one of those or --device=cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"device={device!r} but PyTorch has no MPS (Apple GPU) here: use --device=cpu")
    return device
