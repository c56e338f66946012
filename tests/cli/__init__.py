"""Tests of the ``ism-edge`` command line."""


def one_error_line(result) -> str:
    """The command failed with exactly one `error:` line on stderr and no traceback."""
    assert result.exit_code != 0, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    assert "Traceback" not in result.output + result.stderr
    return errors[0]
