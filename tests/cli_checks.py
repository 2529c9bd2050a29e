"""What every CLI test checks of a refused input."""


def assert_one_line_error(result, names):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hsort: error: ")
    assert str(names) in lines[0]
