"""configurator.py: config files and --key=value overrides, type-checked, unknown keys rejected."""
import pytest
import torch

from configurator import check_choice, check_device, configure

def scope():
    return dict(steps=50, guidance=7.5, prompt="a photo", init_from="tiny", height=None, flip=False,
                resolutions=(16,), torch=pytest, CROP=512)  # a module and an upper-case constant are not settings

def test_overrides_and_types(tmp_path):
    """A config file then --key=value apply in order, with literal parsing and int->float."""
    f = tmp_path / "c.py"
    f.write_text("import math\nsteps = 20\nguidance = 5\nresolutions = [16, 32]\n")
    s = scope()
    out = configure(s, [str(f), "--steps=30", "--prompt=1", "--height=256", "--flip", "--init_from=a/b"])
    assert out == dict(steps=30, guidance=5.0, prompt="1", init_from="a/b", height=256, flip=True,
                       resolutions=(16, 32))
    assert s["steps"] == 30 and isinstance(s["guidance"], float)

def test_a_leading_tilde_is_the_home_folder(monkeypatch):
    """--key=~/x (which the shell leaves as it is after '=') is the home folder's x; a ~ elsewhere stays."""
    monkeypatch.setenv("HOME", "/home/me")
    out = configure(scope(), ["--init_from=~/models/sd", "--prompt=~ a photo"])
    assert out["init_from"] == "/home/me/models/sd" and out["prompt"] == "~ a photo"

@pytest.mark.parametrize("argv,message", [
    (["--stpes=3"], "unknown setting 'stpes'; did you mean 'steps'"),
    (["--steps=3.5"], "'steps' must be int"),
    (["--flip=1"], "'flip' must be bool"),
    (["--steps"], "'steps' takes a value: write --steps=VALUE, with '='"),
    (["--steps=None"], "'steps' must be int"),
    (["--prompt=None"], "'prompt' must be str"),
    (["no_such_file.py"], "cannot read config file no_such_file.py"),
])
def test_errors(argv, message):
    """Typos, wrong types and missing files stop with a message naming the setting or file."""
    with pytest.raises(SystemExit, match=message):
        configure(scope(), argv)

def test_none_only_where_allowed(tmp_path):
    """None replaces a setting only where the default is None or the script names it nullable; a config file's
    comprehension sees the file's other names."""
    f = tmp_path / "c.py"
    f.write_text("_side = 16\nresolutions = tuple(_side * k for k in (1, 2))\n")
    out = configure(scope(), [str(f), "--height=None", "--steps=None"], nullable=("steps",))
    assert out["steps"] is None and out["height"] is None and out["resolutions"] == (16, 32)

def test_unknown_key_in_file(tmp_path):
    """A config file that sets an unknown key is an error naming the file."""
    f = tmp_path / "c.py"
    f.write_text("guidence = 3.0\n")
    with pytest.raises(SystemExit, match=r"c.py: unknown setting 'guidence'; did you mean 'guidance'"):
        configure(scope(), [str(f)])

def test_help_lists_settings(capsys):
    """--help prints the script's docstring and every setting with its default, then exits 0."""
    s = dict(scope(), __doc__="Draw images.")
    with pytest.raises(SystemExit) as e:
        configure(s, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("Draw images.") and "  steps = 50\n" in out and "torch" not in out and "CROP" not in out

def test_help_after_config_shows_effective_values(tmp_path, capsys):
    """--help after a config file and an override shows what they set, with the default beside each
    changed value; an override after --help is never applied."""
    f = tmp_path / "c.py"
    f.write_text("steps = 20\nresolutions = [16, 32]\n")
    with pytest.raises(SystemExit) as e:
        configure(dict(scope(), __doc__="Draw images."), [str(f), "--guidance=3", "--help", "--steps=7"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for line in ("  steps = 20    (default 50)", "  guidance = 3.0    (default 7.5)",
                 "  resolutions = (16, 32)    (default (16,))", "  prompt = 'a photo'\n"):
        assert line in out, f"{line!r} not in:\n{out}"

def test_check_choice():
    """A value outside a fixed set stops with the set listed; a dict's keys are its choices."""
    assert check_choice("dtype", "bf16", {"fp32": 0, "bf16": 1, "fp16": 2}) == "bf16"
    with pytest.raises(SystemExit) as e:
        check_choice("dtype", "fp8", {"fp32": 0, "bf16": 1, "fp16": 2})
    assert str(e.value) == "dtype must be one of 'fp32', 'bf16', 'fp16'; got 'fp8'"

@pytest.mark.parametrize("device,message", [
    ("gpu", "device='gpu' is not a device: use --device=cpu"),
    ("cuda:x", "device='cuda:x' is not a device"),
    ("meta", "device='meta' is not a device"),
    ("cuda", "device='cuda' but PyTorch sees no CUDA GPU (torch.cuda.is_available() is False): use --device=cpu"),
    ("cuda:1", "device='cuda:1' but PyTorch sees no CUDA GPU"),
    ("mps", "device='mps' but PyTorch has no MPS (Apple GPU) here: use --device=cpu"),
])
def test_check_device_refuses(device, message, monkeypatch):
    """Devices this machine lacks (no GPU here: CUDA and MPS made unavailable) and strings that are
    not devices stop with a message saying to use --device=cpu."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        check_device(device)
    assert message in str(e.value), str(e.value)

def test_check_device_accepts(monkeypatch):
    """cpu always passes; with one CUDA GPU, cuda and cuda:0 pass and cuda:1 names the devices there are."""
    assert check_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda") == "cuda" and check_device("cuda:0") == "cuda:0"
    with pytest.raises(SystemExit, match=r"has 1 CUDA device\(s\), cuda:0 to cuda:0"):
        check_device("cuda:1")
