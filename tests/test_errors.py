from guardtune.errors import (
    DataError,
    ExitCode,
    GuardtuneError,
    IntegrityError,
    ModelMismatchError,
    PolicyError,
    SignatureError,
)


def test_exit_codes_are_the_documented_ones():
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert DataError.exit_code == 3
    assert PolicyError.exit_code == 4
    assert SignatureError.exit_code == 5
    assert ModelMismatchError.exit_code == 6
    assert IntegrityError.exit_code == 7
    assert all(issubclass(c, GuardtuneError) for c in (DataError, PolicyError, IntegrityError))


def test_one_line_joins_message_and_hint():
    error = DataError("bad thing\nhappened", hint="do this")
    assert error.one_line() == "bad thing happened (do this)"
    assert "\n" not in error.one_line()
