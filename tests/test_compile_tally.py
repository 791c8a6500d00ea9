"""The run's account of compiling: per batch shape, the first step less the median of the later ones."""
from mindsft.train.monitor import CompileTally


def test_compile_seconds_are_each_shapes_first_step_beyond_its_steady_step():
    tally = CompileTally()
    for shape, seconds in [((2, 128), 30.0), ((2, 128), 1.0), ((2, 256), 50.0), ((2, 128), 1.2), ((2, 128), 0.8),
                           ((2, 256), 2.0)]:
        tally.add(shape, seconds)
    assert abs(tally.compile_seconds() - ((30.0 - 1.0) + (50.0 - 2.0))) < 1e-9
    line = tally.summary()
    assert "2 batch shape(s) [2x128, 2x256]" in line and "77.0 s compiling of 85.0 s in steps (90.6%)" in line


def test_a_shape_met_once_counts_its_whole_step_as_compiling():
    tally = CompileTally()
    tally.add((1, 64), 12.5)
    assert tally.compile_seconds() == 12.5
