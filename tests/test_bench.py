"""Interleaved latency measurement (structure only: timings on a shared machine are noisy)."""

import pytest

from onnxslim_cv.bench import benchmark, node_times, random_feed
from onnxslim_cv.errors import UserError
from onnxslim_cv import runtime
from onnxslim_cv.testing import models


def test_one_model():
    report = benchmark([models.conv_chain()], runs=20, warmup=1)
    (timing,) = report.timings
    assert timing.runs == 20 and 0 < timing.median_ms <= timing.p90_ms
    assert report.ratio is None


def test_two_models_give_a_ratio():
    small, big = models.conv_chain(), models.resnet_bottleneck_block(image_size=32)
    report = benchmark([small, models.conv_chain()], runs=30, warmup=2)
    assert report.ratio > 0 and report.ratio_of_medians > 0
    assert [t.runs for t in report.timings] == [30, 30]
    with pytest.raises(UserError, match="different inputs"):
        other = models.conv_chain()
        other.graph.input[0].name = "other"
        other.graph.node[0].input[0] = "other"
        benchmark([big, other], runs=2)


def test_time_budget_decides_the_run_count():
    report = benchmark([models.conv_chain()], seconds=0.2, warmup=1)
    assert report.timings[0].runs >= 20


def test_dynamic_dims_need_a_shape():
    model = models.unet_like()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    session = runtime.make_session(model)
    with pytest.raises(UserError, match="--input-shape"):
        random_feed(session)
    assert random_feed(session, {"input": (1, 3, 32, 32)})["input"].shape == (1, 3, 32, 32)


def test_bad_arguments():
    with pytest.raises(UserError, match="one or two"):
        benchmark([])
    with pytest.raises(UserError, match="--threads"):
        benchmark([models.conv_chain()], threads=0)


def test_node_times_name_the_model_nodes_that_survive_fusion():
    model = models.conv_chain()  # conv -> bn -> relu, three times: BN and Relu fuse into the convs
    feed = random_feed(runtime.make_session(model))
    (times,) = node_times([model], feed, runs=5, warmup=1)
    convs = [node.name for node in model.graph.node if node.op_type == "Conv"]
    assert sorted(times) == sorted(convs)
    assert all(value > 0 for value in times.values())
    # interleaved: one profile per model, each of its own nodes
    first, second = node_times([model, model], feed, runs=5, warmup=1)
    assert sorted(first) == sorted(second) == sorted(convs)


def test_race_stops_at_max_rounds_for_small_models_and_ranks_by_work():
    import time

    from onnxslim_cv.bench import race

    small = models.conv_chain()
    feed = random_feed(runtime.make_session(small))
    big = models.conv_chain(channels=(128, 256, 256))  # same input, ~250x the MACs
    started = time.perf_counter()
    small_ms, big_ms = race([small, big], feed, seconds=60.0, max_rounds=40)
    assert time.perf_counter() - started < 30  # 40 rounds, not the 60 s budget
    assert 0 < small_ms < big_ms


def test_race_drops_clearly_slower_candidates_and_ends_when_one_is_left():
    import time

    from onnxslim_cv.bench import race

    small = models.conv_chain()
    feed = random_feed(runtime.make_session(small))
    big = models.conv_chain(channels=(128, 256, 256))
    started = time.perf_counter()
    small_ms, big_ms = race([small, big], feed, seconds=60.0, max_rounds=10**6, eliminate=0.02)
    assert time.perf_counter() - started < 20  # decided in the first rounds (0.1 s here), not at the 60 s budget
    assert 0 < small_ms < big_ms


def test_race_keeps_near_ties_running():
    from onnxslim_cv.bench import _still_close

    tied = [[1.00, 1.01, 0.99, 1.02], [1.01, 1.00, 1.02, 0.99], [2.0, 2.1, 1.9, 2.0]]
    assert _still_close([0, 1, 2], tied, 0.02) == [0, 1]  # the 2x one drops, the tie stays
    assert _still_close([0, 1], [[1.0] * 4, [1.03] * 4], 0.02) == [0]  # 3% over the leader's upper quartile
    assert _still_close([0, 1], [[1.0] * 4, [1.015] * 4], 0.02) == [0, 1]
