"""The headless runner when a run goes wrong: which node failed, validation before anything runs, and
an interrupt left over from between runs."""

from __future__ import annotations

import pytest
from slipstream import host
from slipstream.runner import cli
from slipstream.runner.graph import WorkflowError, failed_node, run_workflow

RAN: list[str] = []


class Source:
    RETURN_TYPES = ("INT",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def make(self):
        RAN.append("source")
        host.check_interrupt()
        return (3,)


class Sink:
    RETURN_TYPES = ()
    FUNCTION = "take"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT",), "name": ("STRING", {"default": "ok"})}}

    @classmethod
    def VALIDATE_INPUTS(cls, name=None):
        return True if name is None or "\x00" not in name else "name holds a NUL character"

    def take(self, value, name):
        RAN.append("sink")
        if name == "boom":
            raise RuntimeError("the sink broke on purpose")
        return {"ui": {}, "result": ()}


NODES = {"Source": Source, "Sink": Sink}


def prompt(name: str) -> dict:
    return {"1": {"class_type": "Source", "inputs": {}},
            "7": {"class_type": "Sink", "inputs": {"value": ["1", 0], "name": name}}}


def test_widget_values_are_validated_before_the_first_node_runs():
    RAN.clear()
    with pytest.raises(WorkflowError, match=r"Sink \(node 7\): name holds a NUL"):
        run_workflow(prompt("a\x00b"), NODES)
    assert RAN == []                      # the long upstream node never started


def test_an_interrupt_requested_between_runs_does_not_stop_the_next_run():
    RAN.clear()
    host.request_interrupt()              # e.g. a Ctrl-C while the process sat idle
    run_workflow(prompt("ok"), NODES)
    assert RAN == ["source", "sink"]


def test_a_node_error_carries_the_node_and_keeps_its_type():
    with pytest.raises(RuntimeError, match="on purpose") as err:
        run_workflow(prompt("boom"), NODES)
    node = failed_node(err.value)
    assert (node.node_id, node.class_type) == ("7", "Sink")


@pytest.mark.parametrize("verbose", [False, True])
def test_cli_names_the_failed_node_and_shows_the_traceback_only_when_asked(monkeypatch, capsys, verbose):
    monkeypatch.setattr(cli, "run_file", lambda path: run_workflow(prompt("boom"), NODES))
    monkeypatch.setattr(cli, "_install_sigint", lambda: None)
    code = cli.main(["run", "workflow.json", *(["--verbose"] if verbose else [])])
    err = capsys.readouterr().err
    assert code == 1
    assert "error: node 7 (Sink): RuntimeError: the sink broke on purpose" in err
    assert ("Traceback (most recent call last)" in err) is verbose
    assert ("--verbose for the traceback" in err) is not verbose


def test_demo_says_where_its_folder_stays_unless_one_was_given(monkeypatch, tmp_path):
    import io
    import types

    from slipstream.runner import demos

    case = types.SimpleNamespace(name="one", description="a stand-in", workflow="x.json",
                                 prepare=lambda models, inputs: None)
    monkeypatch.setattr(demos, "demo_cases", lambda: [case])
    monkeypatch.setattr(cli, "run_file", lambda path, out=None: [])
    monkeypatch.setattr(cli.tempfile, "mkdtemp", lambda prefix: str(tmp_path / "made"))
    for name in ("SLIPSTREAM_MODELS", "SLIPSTREAM_INPUT", "SLIPSTREAM_OUTPUT", "SLIPSTREAM_TEMP"):
        monkeypatch.setenv(name, str(tmp_path))      # run_demos repoints them; monkeypatch restores them
    out = io.StringIO()
    assert cli.run_demos(None, [], out=out) == 0
    assert f"The demo folder {tmp_path / 'made'} is kept" in out.getvalue()
    given = io.StringIO()
    assert cli.run_demos(str(tmp_path / "mine"), [], out=given) == 0
    assert "is kept" not in given.getvalue()
