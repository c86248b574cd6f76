"""configurator.py: config files and --key=value overrides, type-checked, unknown keys rejected."""
import pytest

from configurator import configure

def scope():
    return dict(steps=50, guidance=7.5, prompt="a photo", init_from="tiny", height=None, flip=False,
                resolutions=(16,), torch=pytest)  # a module in scope is not a setting

def test_overrides_and_types(tmp_path):
    """A config file then --key=value apply in order, with literal parsing and int->float."""
    f = tmp_path / "c.py"
    f.write_text("import math\nsteps = 20\nguidance = 5\nresolutions = [16, 32]\n")
    s = scope()
    out = configure(s, [str(f), "--steps=30", "--prompt=1", "--height=256", "--flip", "--init_from=a/b"])
    assert out == dict(steps=30, guidance=5.0, prompt="1", init_from="a/b", height=256, flip=True,
                       resolutions=(16, 32))
    assert s["steps"] == 30 and isinstance(s["guidance"], float)

@pytest.mark.parametrize("argv,message", [
    (["--stpes=3"], "unknown setting 'stpes'; did you mean 'steps'"),
    (["--steps=3.5"], "'steps' must be int"),
    (["--flip=1"], "'flip' must be bool"),
    (["--steps"], "'steps' must be int"),
    (["no_such_file.py"], "cannot read config file no_such_file.py"),
])
def test_errors(argv, message):
    """Typos, wrong types and missing files stop with a message naming the setting or file."""
    with pytest.raises(SystemExit, match=message):
        configure(scope(), argv)

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
    assert out.startswith("Draw images.") and "  steps = 50" in out and "torch" not in out
