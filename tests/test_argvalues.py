"""flag_values: what a flag is given in a Megatron argv, both spellings, in order."""

from megaquant.argvalues import flag_values


def test_both_spellings_in_order_and_a_trailing_flag() -> None:
    argv = ["--num-layers", "2", "--seq-length=512", "--num-layers=4", "--bf16", "--eval-iters"]
    assert flag_values(argv, "--num-layers") == ["2", "4"]
    assert flag_values(argv, "--seq-length") == ["512"]
    assert flag_values(argv, "--eval-iters") == [""]
    assert flag_values(argv, "--num-layer") == []  # whole flags only
