"""``m1-jax``: help, unknown commands, dispatch to every subcommand with its arguments, and the
distributed start-up that ``m1-jax train`` shares with ``train.py``."""

import subprocess
import sys
import types


from m1_jax import cli


def test_help_lists_every_command(capsys):
    for argv in ([], ["--help"], ["-h"]):
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: m1-jax COMMAND")
        listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
        assert listed == ["convert", "flops", "generate", "train"]


def test_unknown_command_exits_2(capsys):
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("m1-jax: unknown command 'demo'") and "convert" in err


def test_dispatch_passes_the_arguments_to_each_command(monkeypatch):
    calls = []
    for name, (module, _) in cli.SUBCOMMANDS.items():
        fake = types.ModuleType(module)
        fake.main = lambda argv, name=name: calls.append((name, argv)) or (7 if name == "flops" else None)
        monkeypatch.setitem(sys.modules, module, fake)
    monkeypatch.setattr("sharding.initialize_distributed", lambda: calls.append(("init", [])))
    assert cli.main(["convert", "hf-to-orbax", "a", "b"]) == 0
    assert cli.main(["flops", "--no-plot"]) == 7  # the command's exit status comes back
    assert cli.main(["generate", "--prompt", "x"]) == 0
    assert cli.main(["train", "--gin.TrainConfig.steps=3"]) == 0
    assert calls == [("convert", ["hf-to-orbax", "a", "b"]), ("flops", ["--no-plot"]), ("generate", ["--prompt", "x"]),
                     ("init", []), ("train", ["--gin.TrainConfig.steps=3"])]  # jax.distributed first, for train only


def test_real_commands_behind_the_dispatcher(capsys, monkeypatch, tmp_path):
    assert cli.main(["convert", "--help"]) == 0
    assert "hf-to-orbax" in capsys.readouterr().out
    assert cli.main(["convert", "sideways"]) == 2  # argparse's usage error: status 2, returned
    assert "invalid choice: 'sideways'" in capsys.readouterr().err
    assert cli.main(["generate", "--help"]) == 0
    assert "--checkpoint" in capsys.readouterr().out
    assert cli.main(["flops", "--no-plot", "--lengths", "65536"]) == 0
    assert "< 50% of DeepSeek-R1 at 64K" in capsys.readouterr().out
    started = []
    monkeypatch.setattr("sharding.initialize_distributed", lambda: started.append(True))
    assert cli.main(["train", "--gin.TrainConfig.stpes=3", f"--gin.TrainConfig.run_dir={tmp_path}/r"]) == 2
    assert "stpes" in capsys.readouterr().err and started == [True]
    assert not (tmp_path / "r").exists()


def test_python_dash_m_runs_the_dispatcher():
    out = subprocess.run([sys.executable, "-m", "m1_jax.cli", "--help"], capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0 and out.stdout.startswith("usage: m1-jax COMMAND"), out.stderr
