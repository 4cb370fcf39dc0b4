"""The dials are declared once (engine/plan/dials.py): every Dials field has a flag that parses
into that field and no other."""
import argparse
import dataclasses

import pytest

from engine.plan.dials import Dials, add_dial_arguments, dials_from_args, method_in

# A value for each field unlike its default, as the command line writes it.
_GIVEN = {str: "x", int: "7", float: "0.25"}


def _parser(method: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_dial_arguments(parser, method)
    return parser


def _argv_and_expected(field: dataclasses.Field) -> tuple[list[str], object]:
    spec = field.metadata["flag"]
    flag = spec["flag"] or "--" + field.name.replace("_", "-")
    if spec["switch"]:
        return [flag], True
    if spec["repeatable"]:
        return [flag, "a", flag, "b"], ("a", "b")
    text = str(spec["choices"][-1]) if spec["choices"] else _GIVEN[spec["kind"]]
    return [flag, text], spec["kind"](text)


@pytest.mark.parametrize("field", [f for f in dataclasses.fields(Dials) if "flag" in f.metadata],
                         ids=lambda f: f.name)
def test_each_flag_sets_its_own_field_and_no_other(field):
    argv, expected = _argv_and_expected(field)
    dials = dials_from_args(_parser().parse_args(argv))
    assert getattr(dials, field.name) == expected != field.default
    for other in dataclasses.fields(Dials):
        if other.name != field.name:
            assert getattr(dials, other.name) == getattr(Dials(), other.name), other.name


def test_no_flags_give_the_default_dials():
    assert dials_from_args(_parser().parse_args([])) == Dials()


def test_every_field_but_the_objective_options_has_a_flag():
    assert [f.name for f in dataclasses.fields(Dials) if "flag" not in f.metadata] == ["objective_options"]


def test_objective_options_come_from_the_declarations_and_are_kept_only_when_given():
    parser = _parser("declip")
    assert dials_from_args(parser.parse_args([])).objective_options == {}
    # The text as given: the planner parses it against the method's declaration and says what is wrong.
    dials = dials_from_args(parser.parse_args(["--method", "declip", "--queue-size", "64"]))
    assert dials.method == "declip" and dials.objective_options == {"queue_size": "64"}
    with pytest.raises(SystemExit):   # no registered method declares it
        parser.parse_args(["--no-such-option", "1"])


def test_method_is_read_before_the_parser_exists():
    assert method_in(["--steps", "3", "--method", "siglip", "--queue-size", "9"]) == "siglip"
    assert method_in([]) == Dials().method

